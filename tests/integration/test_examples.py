"""The Hugging Face examples in examples/ run (a couple of steps) and report a finite epsilon."""
import math
import os
import re
import subprocess
import sys

import pytest

from harness import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/ -> repo
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name, steps=2):
    # The child runs the same build as the tests (harness.child_env).
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), "--steps", str(steps)],
                          capture_output=True, text=True, timeout=300, env=child_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps_run = re.findall(r"^step (\d+): batch \d+, loss ([0-9.]+)$", proc.stdout, re.M)
    assert [int(s) for s, _ in steps_run] == list(range(1, steps + 1)), proc.stdout
    eps = re.search(r"^epsilon = ([0-9.]+) at delta = 1e-5 after (\d+) steps$", proc.stdout, re.M)
    assert eps, proc.stdout
    assert 0 < float(eps.group(1)) < math.inf and int(eps.group(2)) == steps
    return proc.stdout


def test_gpt2_finetune():
    pytest.importorskip("transformers")
    run_example("hf_gpt2_finetune.py")


def test_bert_classifier():
    pytest.importorskip("transformers")
    run_example("hf_bert_classifier.py")


def test_lora_peft():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = run_example("hf_lora_peft.py")
    assert re.search(r"^DP-SGD covers 4 tensors \(\d+ parameters\), all lora_A / lora_B, "
                     r"rules \['LinearRule'\]$", out, re.M), out
