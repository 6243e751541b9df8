"""Print command N (1-based) of the first fenced ``bash`` block under README's Quickstart."""

import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
section = text.split("## Quickstart", 1)[1]
block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
if len(commands) != 2:
    sys.exit(f"README Quickstart must hold exactly two commands, found {len(commands)}")
print(commands[int(sys.argv[2]) - 1])
