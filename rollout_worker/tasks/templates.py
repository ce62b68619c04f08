"""Prompt templates, by name or as a str.format string with a {question} field."""

from __future__ import annotations

TEMPLATES: dict[str, str] = {
    # The question as is (the arithmetic task's "a+b=").
    "plain": "{question}",
    # DeepScaleR / the M2PO paper's math prompt.
    "boxed": "{question} Let's think step by step and output the final answer within \\boxed{{}}.",
    # Qwen2.5-Math's chat format written out, for engines that do not apply a chat template.
    "qwen-math": (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
        "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
}


def resolve(template: str | None, default: str) -> str:
    """A bundled template's text, or `template` itself when it is a format string with a {question} field."""
    template = template or default
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{question}" not in template:
        raise ValueError(f"unknown prompt template {template!r}: use one of {sorted(TEMPLATES)} or a string with {{question}}")
    return template


def render(template: str, question: str) -> str:
    return resolve(template, "plain").format(question=question)
