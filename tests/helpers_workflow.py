"""What the workflow tests share: running Snakemake, reading its plan, the config schema and config/README.md's tables."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from conftest import REPO

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def snakemake(*args, cwd=REPO):
    """Run Snakemake in a subprocess (in the repository unless ``cwd``); returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "snakemake", *map(str, args)], cwd=cwd, capture_output=True, text=True)


def job_counts(stdout: str) -> dict[str, int]:
    """{rule: count} from Snakemake's 'Job stats' block (the first one: the plan)."""
    lines = stdout.split("Job stats:", 1)[1].splitlines()
    counts = {}
    for line in lines[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def readme_rows() -> dict[tuple[str, str], list[str]]:
    """{(section, key): [cell, ...]} of config/README.md's key tables: the cells after the key, stripped.

    ``section`` is the heading's key (``## `train` ``) or ``"top"`` for ``## Top level``.
    """
    rows, section = {}, None
    for line in (REPO / "config" / "README.md").read_text().splitlines():
        heading = re.match(r"^## (?:`(\w+)`|Top level)", line)
        if heading:
            section = heading.group(1) or "top"
            continue
        row = re.match(r"^\| `(\w+)` \|((?: [^|]+ \|)+)", line)
        if section and row:
            rows[(section, row.group(1))] = [cell.strip() for cell in row.group(2).split("|")[:-1]]
    return rows


def readme_default(cell: str):
    """The value a default cell of config/README.md stands for (YAML, but ``1e-5`` is a number)."""
    text = cell.replace("`", "").strip()
    value = yaml.safe_load(text)
    if isinstance(value, str) and not text.startswith('"'):
        try:
            return float(value)  # 1e-5 (YAML 1.1 reads it as a string)
        except ValueError:
            return value
    return value
