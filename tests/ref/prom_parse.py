#!/usr/bin/env python3
"""Parses a Prometheus text exposition with the reference parser (prometheus_client) and prints
every sample as `name{label=value,...} value` (labels sorted), one per line: the check of
/metrics' format and values in tests/test_serve_http.c. Exit 1 if it does not parse, 77 if
prometheus_client is missing."""
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("prometheus_client is not installed")
    sys.exit(77)

with open(sys.argv[1], encoding="utf-8") as f:
    text = f.read()
try:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            print(f"{s.name}{{{labels}}} {s.value:g}")
except Exception as e:  # noqa: BLE001 - any parse failure is the finding
    print("PARSE ERROR:", e)
    sys.exit(1)
