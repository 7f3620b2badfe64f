"""The table in docs/reliability.md, from a real run of the fuzz, validation and fault tests.

    python benchmarks/reliability_table.py            # runs the three test files (about a minute), prints the table

Counts come from the run itself: the fuzz tests tally each example's outcome (MLX_INTERNVL_FUZZ_REPORT), and
the targeted tests are counted from pytest's JUnit XML (one row per test function, one count per case).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["tests/test_fuzz.py", "tests/test_validation.py", "tests/test_faults.py"]

# targeted test function -> (input class, what it gives)
TARGETED = {
    "test_generate_options": (
        "CLI sampling/generation options (bad values)",
        "`Error: <option>: expected ..., got ...`, exit 1, before the model loads"),
    "test_lora_options": (
        "CLI LoRA options (0, nan, inf, negative)",
        "`Error: --<option>: expected ...`, exit 1, nothing written"),
    "test_api_arguments": (
        "Python API arguments (types, ranges, empty images/videos)",
        "`UserError` naming the argument"),
    "test_config_values": (
        "config.json values (wrong type/range, list at top level, quantization block)",
        "`UserError`: file, key, expected, got"),
    "test_bad_data_lines_are_listed_up_front": (
        "LoRA data: deep nesting, decompression bomb, truncated JPEG",
        "one `file:line: why` each, found before training"),
    "test_url_that_trickles_is_cut_at_the_deadline": (
        "Image URL trickling bytes (127.0.0.1)",
        "`UserError` at the overall deadline"),
    "test_url_size_cap": (
        "Image URL: endless body, huge Content-Length",
        "`UserError` at the size cap"),
    "test_pixel_limit_does_not_touch_pillows_global": (
        "Pixel limit from 4 threads",
        "refusals per thread; `PIL.Image.MAX_IMAGE_PIXELS` never changes"),
    "test_chat_survives_an_unbalanced_quote": (
        "Chat REPL: `/image \"x`",
        "one error line, the chat goes on"),
    "test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint": (
        "LoRA loss turning NaN mid-run",
        "`UserError` with the step; last good checkpoint kept"),
    "test_sigkill_during_convert_then_rerun": (
        "SIGKILL during convert, then re-run",
        "stale staging folder swept with a note; identical bytes"),
    "test_sigkill_during_export_then_rerun": (
        "SIGKILL during export, then re-run",
        "no partial output; identical bytes"),
    "test_sigkill_during_fuse_then_rerun": (
        "SIGKILL during fuse (replacing an output), then re-run",
        "old output intact after the kill; identical bytes"),
    "test_sigkill_during_a_lora_checkpoint_write_then_resume": (
        "SIGKILL during a LoRA checkpoint write, then --resume",
        "resumes from the last complete checkpoint; identical adapters"),
    "test_resume_passes_over_a_corrupt_newest_checkpoint": (
        "--resume with a truncated newest checkpoint",
        "says which it passed over; identical adapters"),
    "test_full_or_read_only_disk": (
        "Full / read-only disk (tmpfs) during convert, export, fuse",
        "one `Error:` line naming path and cause; previous output intact"),
    "test_full_or_read_only_disk_during_lora": (
        "Full / read-only disk during a LoRA checkpoint",
        "one `Error:` line; previous checkpoint intact"),
    "test_output_whose_parent_is_a_file": (
        "Output path whose parent is a file",
        "one `Error:` line, before any work"),
}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = Path(tmp) / "fuzz.json", Path(tmp) / "junit.xml"
        env = dict(os.environ, MLX_INTERNVL_FUZZ_REPORT=str(report))
        # `python -m pytest` would put the repository on sys.path ahead of the installed package (whose
        # mlx_internvl.cli maps to cli/), so the pytest script of this environment is used, as in development.
        pytest = Path(sys.executable).with_name("pytest")
        r = subprocess.run([str(pytest) if pytest.exists() else "pytest", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={junit}", *FILES], cwd=ROOT, env=env)
        fuzz = json.loads(report.read_text())
        cases = ET.parse(junit).getroot().iter("testcase")
        passed, failed, skipped = Counter(), Counter(), Counter()
        for case in cases:
            name = case.get("name").split("[")[0]
            if case.find("skipped") is not None:
                skipped[name] += 1
            elif case.find("failure") is not None or case.find("error") is not None:
                failed[name] += 1
            else:
                passed[name] += 1
    print("| Input class | Tried | Outcome |")
    print("|---|---:|---|")
    for cls in sorted(fuzz):
        counts = fuzz[cls]
        total = sum(counts.values())
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        print(f"| {cls} (fuzzed) | {total} | {parts}; 0 other exceptions |")
    for name, (cls, gives) in TARGETED.items():
        n = passed[name] + failed[name] + skipped[name]
        note = "" if not (failed[name] or skipped[name]) else f" ({failed[name]} failed, {skipped[name]} skipped)"
        print(f"| {cls} | {n} | {gives}{note} |")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
