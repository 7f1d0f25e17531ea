"""scripts/install.sh says what it does: one progress line per step, and the step count it prints is right."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_step_is_announced_and_counted():
    with open(os.path.join(ROOT, "scripts", "install.sh"), encoding="utf-8") as f:
        text = f.read()
    steps, with_test = map(int, re.search(r"STEPS=(\d+); \[\[ \"\$\{1:-\}\" == \"--test\" \]\] && STEPS=(\d+)", text).groups())
    calls = re.findall(r"^\s*step \"", text, flags=re.M)
    in_test_block = re.search(r'if \[\[ "\$\{1:-\}" == "--test" \]\]; then\n(.*?)\nfi', text, flags=re.S).group(1)
    only_test = len(re.findall(r"^\s*step \"", in_test_block, flags=re.M))
    assert (len(calls) - only_test, len(calls)) == (steps, with_test)
    # every pip install runs after a step line (none silent before the first one)
    first_step = text.index('\nstep "')
    assert "pip_q " not in text[:first_step].replace("pip_q() {", "")
