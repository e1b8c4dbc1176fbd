"""LongBench v1's per-task metrics, following the official definitions (THUDM/LongBench: LongBench/metrics.py and
eval.py), quirks included, so that our scores compare with published ones.

A prediction scores the max over its answers, in [0, 1]; a task scores round(100 * mean, 2) over its samples, and
LongBench-E also per bucket of the sample's `length` field (0-4k, 4-8k, 8k+). The official code stops there:
`summarize` adds the category and language averages of LongBench's tables (see there how they are computed).
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter

import jieba
import numpy as np
from rouge import Rouge

from megalign.errors import MegalignError

with warnings.catch_warnings():  # no python-Levenshtein (nor in upstream's requirements): difflib, and a warning
    warnings.simplefilter("ignore")
    from fuzzywuzzy import fuzz

TASK_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge",
    "qmsum": "rouge",
    "multi_news": "rouge",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge",
    "lsht": "classification",
    "passage_count": "count",
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})  # few-shot: the model goes on with more examples
CATEGORIES: dict[str, tuple[str, ...]] = {  # LongBench's README tables
    "Single-Doc QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "Multi-Doc QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "Summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "Few-shot Learning": ("trec", "triviaqa", "samsum", "lsht"),
    "Synthetic Tasks": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "Code Completion": ("lcc", "repobench-p"),
}
ZH_TASKS = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})  # LongBench/task.md
CODE_TASKS = frozenset(CATEGORIES["Code Completion"])  # the other 14 are English

_EN_PUNCTUATION = frozenset(string.punctuation)
# upstream's list as is (it has 》 but not 《), plus ASCII punctuation
_ZH_PUNCTUATION = _EN_PUNCTUATION | frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
# Upstream calls Rouge() with its default rouge-1/2/l; rouge-1/2 raise exactly when rouge-l does, so only rouge-l
_ROUGE = Rouge(metrics=["rouge-l"])


def _f1(prediction: list[str], reference: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())  # repeated tokens match at most min(counts) times
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def _tokens_en(text: str) -> list[str]:
    """SQuAD-style normalization: lowercase, drop punctuation ("U.S." -> "us"), then articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _tokens_zh(text: str) -> list[str]:
    """jieba words, each lowercased and stripped of punctuation and whitespace; the words left empty are dropped."""
    words = ("".join(ch for ch in word.lower() if ch not in _ZH_PUNCTUATION and not ch.isspace())
             for word in jieba.cut(text, cut_all=False))
    return [word for word in words if word]


def _qa_f1(prediction: str, answer: str, all_classes: list[str] | None) -> float:
    return _f1(_tokens_en(prediction), _tokens_en(answer))


def _qa_f1_zh(prediction: str, answer: str, all_classes: list[str] | None) -> float:
    return _f1(_tokens_zh(prediction), _tokens_zh(answer))


def _rouge(prediction: str, answer: str, all_classes: list[str] | None) -> float:
    # Upstream scores any exception 0: the package raises on an empty text (nothing between its "." splits), and its
    # LCS backtracking recurses once per step, so a sentence of ~1000 words (Python's default recursion limit, less the
    # caller's stack) hits RecursionError too.
    try:
        return _ROUGE.get_scores([prediction], [answer], avg=True)["rouge-l"]["f"]
    except Exception:
        return 0.0


def _rouge_zh(prediction: str, answer: str, all_classes: list[str] | None) -> float:
    # the rouge package splits words on spaces; there are none between Chinese words until jieba puts them there
    return _rouge(" ".join(jieba.cut(prediction, cut_all=False)), " ".join(jieba.cut(answer, cut_all=False)), None)


def _classification(prediction: str, answer: str, all_classes: list[str] | None) -> float:
    matches = [name for name in all_classes if name in prediction]
    # Upstream drops the matches that are a proper substring of the answer while iterating over that same list: the
    # index still advances after a removal, so the match right after a dropped one is never checked (answer "the",
    # matches [t, h, the] keeps [h, the]: 0.5). Walking an index and list.remove reproduce it, duplicates included.
    i = 0
    while i < len(matches):
        if matches[i] in answer and matches[i] != answer:
            matches.remove(matches[i])
        i += 1
    return 1.0 / len(matches) if answer in matches else 0.0


def _number_share(prediction: str, target: str) -> float:
    """The share of the numbers in the prediction that are `target` (as strings): naming every candidate wins little."""
    numbers = re.findall(r"\d+", prediction)
    return numbers.count(target) / len(numbers) if numbers else 0.0


def _paragraph_share(prediction: str, answer: str, pattern: str) -> float:
    found = re.findall(pattern, answer)
    if not found:
        raise MegalignError(f"LongBench retrieval answer {answer!r} does not match {pattern!r}")
    return _number_share(prediction, found[0])


def _retrieval(prediction: str, answer: str, all_classes: list[str] | None) -> float:
    return _paragraph_share(prediction, answer, r"Paragraph (\d+)")


def _retrieval_zh(prediction: str, answer: str, all_classes: list[str] | None) -> float:
    return _paragraph_share(prediction, answer, r"段落(\d+)")


def _count(prediction: str, answer: str, all_classes: list[str] | None) -> float:
    return _number_share(prediction, answer)  # the whole answer string, as upstream: "07" is not "7"


def _code_sim(prediction: str, answer: str, all_classes: list[str] | None) -> float:
    # The first line that is no markdown fence and no comment; upstream's test also skips a code line with a trailing
    # comment or any "#" (a C# directive, a string), and lines of only whitespace are kept.
    lines = prediction.lstrip("\n").split("\n")
    line = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz.ratio(line, answer) / 100  # an integer percent (difflib's ratio, rounded); ("", "") is 100


_METRICS = {
    "qa_f1": _qa_f1,
    "qa_f1_zh": _qa_f1_zh,
    "rouge": _rouge,
    "rouge_zh": _rouge_zh,
    "classification": _classification,
    "retrieval": _retrieval,
    "retrieval_zh": _retrieval_zh,
    "count": _count,
    "code_sim": _code_sim,
}


def _check_task(task: str) -> None:
    if task not in TASK_METRIC:
        raise MegalignError(f"unknown LongBench task {task!r}; known: {', '.join(TASK_METRIC)}")


def score_prediction(task: str, prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    """One sample's score in [0, 1]: the best over its answers (0 without any); all_classes: trec's, lsht's labels."""
    _check_task(task)
    metric = TASK_METRIC[task]
    if metric == "classification" and all_classes is None:
        raise MegalignError(f"LongBench task {task!r} is scored against its all_classes, and none were given")
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((_METRICS[metric](prediction, answer, all_classes) for answer in answers), default=0.0)


def task_score(scores: list[float]) -> float:
    """A task's score, as upstream's scorer: round(100 * mean, 2)."""
    if not scores:
        raise ValueError("a task score needs at least one sample")
    return round(100 * sum(scores) / len(scores), 2)


def length_bucket(length: int) -> str:
    """LongBench-E's bucket of a sample by its `length` field (words, or characters for Chinese)."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def bucket_scores(scores: list[float], lengths: list[int]) -> dict[str, float]:
    """LongBench-E's per-bucket task scores; upstream reports NaN for an empty bucket, we leave it out."""
    buckets: dict[str, list[float]] = {}
    for score, length in zip(scores, lengths, strict=True):
        buckets.setdefault(length_bucket(length), []).append(score)
    # upstream's scorer_e takes numpy's mean and round, which can differ from task_score in the last digit
    return {name: float(round(100 * np.mean(buckets[name]), 2))
            for name in ("0-4k", "4-8k", "8k+") if name in buckets}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(per_task: dict[str, float]) -> dict:
    """Category and overall averages of task scores; the official eval.py computes none, so here is how ours are.

    categories: per category, the unweighted mean of its tasks that are in per_task (categories without any left out).
    overall: the unweighted mean of all the task scores given.
    en, zh: as LongBench's README leaderboard, per category the mean over that language's tasks and the code tasks
    (Code Completion counts for both), and `average` the unweighted mean of those category means; each only when a
    task of its language is given. This reproduces the README's English and Chinese "Avg" columns from its per-task
    tables. Every average is rounded to 2 decimals, like a task score.
    """
    if not per_task:
        raise ValueError("no task scores to summarize")
    for task in per_task:
        _check_task(task)

    def category_means(tasks: set[str]) -> dict[str, float]:
        return {name: _mean([per_task[t] for t in members if t in tasks])
                for name, members in CATEGORIES.items() if tasks.intersection(members)}

    summary = {
        "categories": {name: round(mean, 2) for name, mean in category_means(set(per_task)).items()},
        "overall": round(_mean(list(per_task.values())), 2),
    }
    for language, own in (("en", set(per_task) - ZH_TASKS - CODE_TASKS), ("zh", set(per_task) & ZH_TASKS)):
        if own:
            means = category_means(own | (set(per_task) & CODE_TASKS))
            summary[language] = {"categories": {name: round(mean, 2) for name, mean in means.items()},
                                 "average": round(_mean(list(means.values())), 2)}
    return summary
