"""Parses a scrape read from stdin with the official Prometheus Python client and prints every
sample as JSON lines: {"name": ..., "labels": {...}, "value": ..., "type": ...}.

    parse.py text          # Prometheus text format 0.0.4 (prometheus_client.parser)
    parse.py openmetrics   # OpenMetrics 1.0 (prometheus_client.openmetrics.parser), strict

Any parse error ends the program with status 1 and the parser's message on stderr.
"""

import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families


def main():
    fmt = sys.argv[1]
    data = sys.stdin.read()
    families = openmetrics_families(data) if fmt == "openmetrics" else text_families(data)
    try:
        for family in families:
            for sample in family.samples:
                print(
                    json.dumps(
                        {
                            "name": sample.name,
                            "labels": sample.labels,
                            "value": sample.value,
                            "type": family.type,
                        }
                    )
                )
    except Exception as e:  # the parsers raise ValueError and others
        print(f"parse error ({fmt}): {e}", file=sys.stderr)
        sys.exit(1)


main()
