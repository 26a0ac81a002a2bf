"""The demo (`make demo` = `python -m lineguard.deploy.demo`): the whole line on one laptop.

`cli` drives the steps, `line` runs and watches the edge service, `report` writes the HTML
report, `support` holds the subprocess and MQTT plumbing. See `cli`'s docstring for the steps.
"""

from lineguard.deploy.demo.cli import main, parse_args

__all__ = ["main", "parse_args"]
