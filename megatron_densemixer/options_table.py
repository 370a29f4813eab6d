"""The README's options table, made from ``DenseMixerOptions``' fields.

``python -m megatron_densemixer.options_table`` prints it; ``tests/test_docs.py`` fails when
the README's copy differs.
"""

from __future__ import annotations

import dataclasses

from megatron_densemixer.options import DenseMixerOptions


def options_markdown_table() -> str:
    """One markdown row per option: its name, its default and its help text.

    Returns:
        The table, header included, without a trailing newline.
    """
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(DenseMixerOptions):
        meaning = " ".join(field.metadata["help"].split()).replace("|", "\\|")
        rows.append(f"| `{field.name}` | `{field.default!r}` | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m megatron_densemixer.options_table",
        description="Prints the markdown table of the moe_dense_router_grad* options (the "
        "README's options table).",
    ).parse_args()
    print(options_markdown_table())
