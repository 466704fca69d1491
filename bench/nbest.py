"""``python -m bench --nbest``: what sharing prefixes saves when /score rescores an n-best list.

Realistic lists: for each of ``lists`` PTB validation sentences of 18-22 words, 10 hypotheses
(the sentence and 9 variants) that differ from it in 1-3 words at random positions (replacement
words drawn from the vocabulary), as a speech recogniser's n-best list does. Each list is scored
through the service's scheduler, in process, three ways, one after another per list:

- ``shared``: one request with the 10 texts, prefix sharing on (the service's default);
- ``batched``: one request with the 10 texts, sharing off (one padded call, as before sharing);
- ``alone``: 10 requests one after another, one text each.

It reports the median time per list of each, the ratios, the token positions computed, and the
largest difference between a shared and an alone log-probability."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

from app.cache import PrefixStateCache
from app.prefix_trie import plan_scoring
from app.registry import ModelRegistry
from app.scheduler import Admission, Scheduler

HYPOTHESES = 10
SENTENCE_WORDS = range(18, 23)


def nbest_lists(sentences: list[list[str]], words: list[str], lists: int, clustered: bool,
                seed: int = 0) -> list[list[str]]:
    """``lists`` n-best lists of ``HYPOTHESES`` texts built from ``sentences`` of 18-22 words: each
    variant changes 1-3 words, anywhere in the sentence, or (``clustered``) only at 3 uncertain
    positions of the sentence, with one of 2 alternative words each, as a recogniser's confusions
    cluster."""
    rng = random.Random(seed)
    chosen = rng.sample([s for s in sentences if len(s) in SENTENCE_WORDS], lists)
    result = []
    for sentence in chosen:
        hypotheses = [" ".join(sentence)]
        uncertain = rng.sample(range(len(sentence)), 3)
        alternatives = {position: rng.sample(words, 2) for position in uncertain}
        while len(hypotheses) < HYPOTHESES:
            variant = list(sentence)
            for position in rng.sample(uncertain if clustered else range(len(variant)), rng.randint(1, 3)):
                variant[position] = rng.choice(alternatives[position]) if clustered else rng.choice(words)
            if " ".join(variant) not in hypotheses:
                hypotheses.append(" ".join(variant))
        result.append(hypotheses)
    return result


def run_nbest(store: Path, valid: Path, lists: int, threads: int) -> dict:
    """Both kinds of list (changes anywhere, changes clustered), measured one after the other."""
    registry = ModelRegistry(store, threads, max_tokens=256)
    registry.load_all()
    lm = registry.language_model(None)
    sentences = [line.split() for line in valid.read_text(encoding="utf-8").splitlines() if line.strip()]
    words = [w for w in lm.vocab.tokens if not w.startswith("<")]
    return {"model": lm.ref, "lists": lists, "hypotheses": HYPOTHESES, "threads": threads,
            **{kind: _measure(lm, nbest_lists(sentences, words, lists, kind == "clustered"))
               for kind in ("anywhere", "clustered")}}


def _measure(lm, data: list[list[str]]) -> dict:

    async def main() -> dict:
        scheduler = Scheduler(Admission(60.0), PrefixStateCache(0), timeout=60.0)
        times: dict[str, list[float]] = {"shared": [], "batched": [], "alone": []}
        worst = 0.0
        try:
            for texts in [data[0], *data]:  # the first list once more, untimed, to warm up
                started = time.perf_counter()
                scheduler.share_prefixes = True
                shared, _ = await scheduler.score(lm, texts, True, "float32")
                shared_s = time.perf_counter() - started
                started = time.perf_counter()
                scheduler.share_prefixes = False
                await scheduler.score(lm, texts, True, "float32")
                batched_s = time.perf_counter() - started
                started = time.perf_counter()
                alone = [(await scheduler.score(lm, [text], True, "float32"))[0][0] for text in texts]
                alone_s = time.perf_counter() - started
                for name, seconds in (("shared", shared_s), ("batched", batched_s), ("alone", alone_s)):
                    times[name].append(seconds)
                for a, b in zip(shared, alone, strict=True):
                    worst = max([worst, *(abs(x[1] - y[1]) for x, y in zip(a.token_log_probs, b.token_log_probs,
                                                                              strict=True))])
        finally:
            scheduler.close()
        return {name: values[1:] for name, values in times.items()} | {"max_abs_diff": worst}

    measured = asyncio.run(main())
    positions = {"shared": 0, "alone": 0}
    for texts in data:
        _, targets = lm.score_targets(texts, True)
        positions["shared"] += plan_scoring(targets, lm.eos_id).positions
        positions["alone"] += sum(map(len, targets))
    median = {name: statistics.median(measured[name]) * 1000 for name in ("shared", "batched", "alone")}
    return {
        "median_ms": {name: round(ms, 2) for name, ms in median.items()},
        "speedup_vs_alone": round(median["alone"] / median["shared"], 2),
        "speedup_vs_batched": round(median["batched"] / median["shared"], 2),
        "positions": positions,
        "max_abs_diff": measured["max_abs_diff"],
    }


def table(results: dict) -> str:
    lines = [
        f"n-best rescoring: {results['lists']} lists of {results['hypotheses']} hypotheses (PTB valid sentences of "
        f"18-22 words, 1-3 words changed), {results['model']}, {results['threads']} threads; median ms per list",
        "| words changed | prefixes shared (default) | no sharing, one padded call | one request per text | "
        "positions computed | largest difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, label in (("anywhere", "anywhere"), ("clustered", "at 3 uncertain positions")):
        r = results[kind]
        ms, positions = r["median_ms"], r["positions"]
        lines.append(
            f"| {label} | {ms['shared']:.1f} | {ms['batched']:.1f} ({r['speedup_vs_batched']:.2f}x) | "
            f"{ms['alone']:.1f} ({r['speedup_vs_alone']:.2f}x) | {positions['shared'] / positions['alone']:.0%} | "
            f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines)
