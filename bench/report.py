"""Keep docs/benchmarks.md in step with the benches: one marked section per script.

Each bench builds its markdown (the same lines it prints) and, with `--update-docs`, calls
`update_section`, which replaces only the text between that script's two markers and stamps it
with the machine, the date, the load and the command. Sections of other scripts are left alone,
so benches can be re-run one at a time, in any order.

For a bench that does not call this module itself, save its output and file it by hand:

    .venv/bin/python bench/train_throughput.py --quick | tee /tmp/tt.txt
    .venv/bin/python bench/report.py --section train_throughput \
        --title "Training throughput" --command "bench/train_throughput.py --quick" /tmp/tt.txt
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import statistics
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

PREAMBLE = """# Benchmarks

Each section below is written by one script in `bench/` (run it with `--update-docs` to
regenerate that section only) and says on which machine, when, under what load and with which
command it was measured. The machine used so far is a shared 2-core CPU box: other jobs ran at
the same time, so timings carry noticeable noise (the load average is given for each run).
GPU rows are out of scope until a GPU machine runs these scripts.
"""


def mean_sd(values: list[float | None], digits: int = 4) -> str:
    """The values' mean ± sample sd ("-" for none; a single value alone, no sd)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def per_seed(values: list[float | None], digits: int = 3) -> str:
    """The values of each seed, "a / b / c" ("-" where a seed has none)."""
    return " / ".join("-" if v is None else f"{v:.{digits}f}" for v in values)


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, core count, accelerator, library versions."""
    try:
        import torch

        gpu = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
        tv = f"torch {torch.__version__}, "
    except ImportError:  # report.py's CLI works without torch
        gpu, tv = "GPU unknown", ""
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, {gpu}; {tv}python "
            f"{platform.python_version()}")


def load() -> str:
    """The 1/5/15-minute load averages: how busy the shared machine was."""
    a, b, c = os.getloadavg()
    return f"{a:.2f} / {b:.2f} / {c:.2f}"


def command_line(argv: list[str] | None = None) -> str:
    """The command that produced a section, relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    try:
        argv[0] = str(script.resolve().relative_to(DOC.parents[1]))
    except ValueError:
        pass
    return ".venv/bin/python " + " ".join(shlex.quote(a) for a in argv)


def _markers(key: str) -> tuple[str, str]:
    if not re.fullmatch(r"[a-z0-9_]+", key):
        raise ValueError(f"section key {key!r}: use lower-case letters, digits and _")
    return f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"


def render(key: str, title: str, body: str, command: str, *, when: str | None = None,
           machine_line: str | None = None, load_line: str | None = None) -> str:
    """The marked block of one section (markers included)."""
    start, end = _markers(key)
    stamp = when or _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [start, f"## {title}", "",
             f"- command: `{command}`",
             f"- machine: {machine_line or machine()}",
             f"- date: {stamp}"]
    if load_line:
        lines.append(f"- load average (1/5/15 min): {load_line}")
    lines += ["", body.strip("\n"), "", end]
    return "\n".join(lines)


def update_section(key: str, title: str, body: str, command: str | None = None, *,
                   doc: Path = DOC, when: str | None = None, machine_line: str | None = None,
                   load_line: str | None = None) -> Path:
    """Replace (or append) the section `key` of `doc`; every other byte stays as it was."""
    block = render(key, title, body, command or command_line(), when=when,
                   machine_line=machine_line, load_line=load_line)
    text = doc.read_text() if doc.exists() else PREAMBLE
    start, end = _markers(key)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)
    return doc


def as_markdown(raw: str, fence: bool = True) -> str:
    """A bench's plain output made safe to embed: its '# ' headings become bold lines, and
    (with `fence`) runs of non-table lines (aligned text tables, logs) are fenced so they keep
    their layout; without it the output is taken to be markdown already."""
    out: list[str] = []
    block: list[str] = []

    def flush() -> None:
        if block:
            out.extend(["```", *block, "```"])
            block.clear()

    for line in raw.splitlines():
        if line.startswith("|"):
            flush()
            out.append(line)
        elif line.startswith("#"):
            flush()
            out.append(f"**{line.lstrip('#').strip()}**")
        elif not line.strip():
            flush()
            out.append("")
        elif fence:
            block.append(line)
        else:
            out.append(line)
    flush()
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description="File a bench's saved output as its section of "
                                             "docs/benchmarks.md")
    ap.add_argument("output", help="file holding the bench's stdout ('-' for stdin)")
    ap.add_argument("--section", required=True, help="section key, e.g. train_throughput")
    ap.add_argument("--title", required=True)
    ap.add_argument("--command", required=True, help="the command that produced the output")
    ap.add_argument("--when", help="date of the run (default: now)")
    ap.add_argument("--load", help="load averages during the run, e.g. '1.2 / 1.0 / 0.8 at "
                                   "start, ...' (default: not stated)")
    ap.add_argument("--markdown", action="store_true",
                    help="the output is markdown already: keep its lines as they are (default: "
                         "fence plain-text lines so aligned columns survive)")
    ap.add_argument("--note", action="append", default=[],
                    help="a markdown paragraph to add after the output (repeatable)")
    ap.add_argument("--doc", default=str(DOC))
    args = ap.parse_args()
    raw = sys.stdin.read() if args.output == "-" else Path(args.output).read_text()
    body = "\n\n".join([as_markdown(raw, fence=not args.markdown), *args.note])
    path = update_section(args.section, args.title, body, args.command,
                          doc=Path(args.doc), when=args.when, load_line=args.load)
    print(f"updated section '{args.section}' of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
