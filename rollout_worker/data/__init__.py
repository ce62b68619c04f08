"""Small sample files bundled with the package (tests, examples)."""

from pathlib import Path

# 12 short math problems with reference answers, in the `math` task's JSONL format.
MATH_SAMPLE = Path(__file__).with_name("math_sample.jsonl")
