"""Loss, train loop, optimizer and schedule, metrics and logging."""
