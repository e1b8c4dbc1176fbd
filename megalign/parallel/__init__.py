"""Process groups, device selection and the CPU mode."""
