"""`pulumi up --stack <name>`: Pulumi runs this directory; the program itself is infra/program.py."""

import pulumi

from infra.program import build

for key, value in build(pulumi.get_stack()).items():
    pulumi.export(key, value)
