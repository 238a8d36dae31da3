"""Safety detectors: precision and recall on a labeled set, and the latency they add.

The labeled set (`bench/data/safety_labeled.jsonl`) holds one example per line: the text and
the detectors that should fire on it (`email`, `phone`, `card`, `iban`, `national_id`, `ip`,
`injection`, `blocklist`); an empty list is a negative. Most negatives are hard ones: numbers
that fail Luhn or mod-97, never-issued SSNs, version strings shaped like IPs, benign text that
says "ignore" or "system prompt", emoji sequences with joiners, base64 that decodes to nothing
harmful. The blocklist is scored with the terms "zorblax" and "banana split".

Latency: the input pipeline as the default policy runs it (PII, injection, blocklist) per
message, and the output pipeline (PII, blocklist) as the stream publisher runs it: on the whole
answer so far at every flush, here every 4 tokens (~16 characters) of a ~1,100-character
answer, which is about how often the 50 ms flush interval falls at CPU decode speed.

    python bench/safety.py            # no database or model needed
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from governance.safety.base import Action  # noqa: E402
from governance.safety.blocklist import BlocklistFilter  # noqa: E402
from governance.safety.injection import InjectionFilter  # noqa: E402
from governance.safety.pii import PiiFilter  # noqa: E402
from governance.safety.pipeline import FilterStep, Pipeline  # noqa: E402

DATA = BASE_DIR / "bench" / "data" / "safety_labeled.jsonl"
DETECTORS = ("email", "phone", "card", "iban", "national_id", "ip", "injection", "blocklist")
TERMS = ["zorblax", "banana split"]
PII_LABEL = {"ssn": "national_id", "nino": "national_id", "dni": "national_id"}


def predicted(
    text: str, pii: PiiFilter, injection: InjectionFilter, blocklist: BlocklistFilter
) -> set[str]:
    labels = {PII_LABEL.get(f.kind, f.kind) for f in pii.scan(text)}
    if injection.scan(text):
        labels.add("injection")
    if blocklist.scan(text):
        labels.add("blocklist")
    return labels


def _pct(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20, help="timing passes over the set")
    parser.add_argument("--threshold", type=float, default=0.5, help="injection threshold")
    parser.add_argument("--show-errors", action="store_true")
    args = parser.parse_args()

    examples = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    pii = PiiFilter()
    injection = InjectionFilter(threshold=args.threshold)
    blocklist = BlocklistFilter(terms=TERMS)

    counts: dict[str, Counter[str]] = {d: Counter() for d in DETECTORS}
    errors = []
    for ex in examples:
        truth, got = set(ex["labels"]), predicted(ex["text"], pii, injection, blocklist)
        for d in DETECTORS:
            key = ("tp" if d in truth else "fp") if d in got else ("fn" if d in truth else "tn")
            counts[d][key] += 1
        if truth != got:
            errors.append((ex["text"], sorted(truth), sorted(got)))

    positives = sum(1 for ex in examples if ex["labels"])
    print(
        f"# safety detectors: {len(examples)} labeled examples "
        f"({positives} with at least one label, {len(examples) - positives} negatives)"
    )
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )
    print(f"# injection threshold {args.threshold}\n")
    print("| detector    | positives | TP | FP | FN | precision | recall |")
    print("| ----------- | --------: | -: | -: | -: | --------: | -----: |")
    for d in DETECTORS:
        c = counts[d]
        precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else float("nan")
        recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else float("nan")
        print(
            f"| {d:<11} | {c['tp'] + c['fn']:>9} | {c['tp']:>2} | {c['fp']:>2} | {c['fn']:>2} "
            f"| {precision:>9.3f} | {recall:>6.3f} |"
        )
    if args.show_errors:
        print("\nmisclassified (text, expected, got):")
        for text, expected, found in errors:
            print(f"- {text!r}: expected {expected}, got {found}")

    input_pipeline = Pipeline(
        [
            FilterStep(pii, Action.REDACT),
            FilterStep(injection, Action.FLAG),
            FilterStep(blocklist, Action.BLOCK),
        ]
    )
    output_pipeline = Pipeline([FilterStep(pii, Action.FLAG), FilterStep(blocklist, Action.BLOCK)])
    for ex in examples:  # warm up (phonenumbers loads its metadata lazily)
        input_pipeline.run(ex["text"])

    per_message = []
    for _ in range(args.repeat):
        for ex in examples:
            start = time.perf_counter()
            input_pipeline.run(ex["text"])
            per_message.append((time.perf_counter() - start) * 1000)

    answer = " ".join(ex["text"] for ex in examples if not ex["labels"])[:1100]
    step = 16  # characters per flush: ~4 tokens
    per_check, per_answer = [], []
    for _ in range(args.repeat):
        total = 0.0
        for end in range(step, len(answer) + step, step):
            start = time.perf_counter()
            output_pipeline.run(answer[:end])
            elapsed = (time.perf_counter() - start) * 1000
            per_check.append(elapsed)
            total += elapsed
        per_answer.append(total)
    checks = len(per_check) // args.repeat

    print(
        f"\n| latency added ({args.repeat} passes)                        | p50 (ms) | p95 (ms) |"
    )
    print("| ------------------------------------------------- | -------: | -------: |")
    print(
        f"| input filters, per message ({len(examples)} messages)         "
        f"| {_pct(per_message, 50):>8.2f} | {_pct(per_message, 95):>8.2f} |"
    )
    print(
        f"| output filters, per flush check (answer so far)   "
        f"| {_pct(per_check, 50):>8.2f} | {_pct(per_check, 95):>8.2f} |"
    )
    print(
        f"| output filters, whole {len(answer)}-char answer ({checks} checks) "
        f"| {_pct(per_answer, 50):>8.2f} | {_pct(per_answer, 95):>8.2f} |"
    )


if __name__ == "__main__":
    main()
