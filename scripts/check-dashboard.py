#!/usr/bin/env python3
"""Checks the Grafana dashboard for dps's Prometheus metrics.

Usage: scripts/check-dashboard.py DASHBOARD [METRICS_TEXT_FILE]

Checks that DASHBOARD (docs/grafana-dashboard.json) is well-formed for Grafana's "Import
dashboard": it has a title, a uid, a schemaVersion, panels (rows included, and the panels of
collapsed rows) with unique ids and a valid gridPos, and a datasource template variable that the
panels and queries refer to rather than a fixed data source. Then it reads the metric names used
by every PromQL `expr` and checks each is one dps exports; a histogram must be used through its
`_bucket`, `_sum` or `_count` series.

With METRICS_TEXT_FILE, a scrape of GET /metrics, it also checks that every base metric name the
dashboard uses appears there (as `# TYPE` or as a sample) and prints the ones missing. A metric
shows up in a scrape only once it has been recorded, so scrape a server that has done some work.

Prints `dashboard: ok (N panels, M metrics)` and exits 0 when all is well; otherwise prints each
problem and exits 1 (2 for a usage error). Python 3 standard library only.
"""
import json
import re
import sys

COUNTERS = {
    "dps_registrations_total",
    "dps_operation_polls_total",
    "dps_auth_rejections_total",
    "dps_tls_handshake_failures_total",
    "dps_http_requests_total",
    "dps_webhook_calls_total",
    "dps_hub_registrar_calls_total",
    "dps_events_delivered_total",
    "dps_event_delivery_failures_total",
}
GAUGES = {
    "dps_connections_open",
}
HISTOGRAMS = {
    "dps_registration_duration_seconds",
    "dps_webhook_call_duration_seconds",
    "dps_hub_registrar_call_duration_seconds",
    "dps_store_commit_duration_seconds",
    "dps_store_commit_batch_size",
    "dps_event_drain_duration_seconds",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# PromQL words that look like identifiers but are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan", "start", "end", "atan2",
}
# Clauses whose parenthesised list holds label names, not metrics.
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(", re.IGNORECASE)
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)")
NAME_MATCHER = re.compile(r"__name__\s*=\s*(\"([^\"\\]|\\.)*\"|'([^'\\]|\\.)*')")


def allowed(name):
    """None if `name` may be queried, else the reason it may not."""
    if name in COUNTERS or name in GAUGES:
        return None
    if name in HISTOGRAMS:
        return "is a histogram: query its _bucket, _sum or _count series"
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return None
    return "is not a dps metric"


def base_name(name):
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def skip_balanced(expr, i, open_ch, close_ch):
    """Index just past the bracket closing the one at expr[i], skipping quoted strings."""
    depth = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = skip_string(expr, i)
            continue
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {open_ch!r}")


def skip_string(expr, i):
    quote = expr[i]
    j = i + 1
    while j < len(expr):
        if expr[j] == "\\" and quote != "`":
            j += 2
            continue
        if expr[j] == quote:
            return j + 1
        j += 1
    raise ValueError("unterminated string")


def metric_names(expr):
    """The metric names an expression selects, in order of first use."""
    names = []

    def add(n):
        if n not in names:
            names.append(n)

    # Metric names given as {__name__="..."}.
    for m in NAME_MATCHER.finditer(expr):
        add(m.group(1)[1:-1])

    i = 0
    n = len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            i = skip_string(expr, i)
        elif c == "#":  # comment to end of line
            j = expr.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "{":  # label matchers
            i = skip_balanced(expr, i, "{", "}")
        elif c == "[":  # range or subquery duration
            i = skip_balanced(expr, i, "[", "]")
        elif c == "$":  # Grafana variable: $name, ${name}, ${name:format}, [[name]]
            if i + 1 < n and expr[i + 1] == "{":
                i = skip_balanced(expr, i + 1, "{", "}")
            else:
                m = IDENT.match(expr, i + 1)
                i = m.end() if m else i + 1
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            m = NUMBER.match(expr, i)
            i = m.end()
            # A duration such as 5m or 1h30m after `offset` or `@`.
            while i < n and (expr[i].isalnum() or expr[i] == "_"):
                i += 1
        else:
            m = IDENT.match(expr, i)
            if not m:
                i += 1
                continue
            word = m.group(0)
            end = m.end()
            label_list = LABEL_LIST.match(expr, i)
            if label_list:
                i = skip_balanced(expr, label_list.end() - 1, "(", ")")
                continue
            k = end
            while k < n and expr[k].isspace():
                k += 1
            if k < n and expr[k] == "(":
                i = end  # a function or aggregation
            elif re.match(r"(by|without)\s*\(", expr[k:], re.IGNORECASE):
                i = end  # an aggregation with its grouping first: sum by (x) (...)
            elif word.lower() in KEYWORDS:
                i = end
            else:
                add(word)
                i = end
    return names


def scraped_names(path):
    """Every metric name a Prometheus text exposition mentions, as `# TYPE` or a sample."""
    names = set()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split()
                if len(parts) >= 3 and parts[1] in ("TYPE", "HELP"):
                    names.add(parts[2])
                continue
            m = IDENT.match(line)
            if m:
                names.add(m.group(0))
    return names


def all_panels(panels, problems, where="panels"):
    """The panels of the dashboard, the panels inside rows included."""
    out = []
    if not isinstance(panels, list):
        problems.append(f"{where} is not a list")
        return out
    for idx, p in enumerate(panels):
        if not isinstance(p, dict):
            problems.append(f"{where}[{idx}] is not an object")
            continue
        out.append(p)
        if p.get("type") == "row" and "panels" in p:
            out.extend(all_panels(p["panels"], problems, f"{where}[{idx}].panels"))
    return out


def label(p):
    return f"panel {p.get('id')!r} ({p.get('title', '')!r})"


def check(dashboard, problems):
    """Checks the dashboard's structure; returns [(panel, expr)] to check further."""
    if not isinstance(dashboard, dict):
        problems.append("the dashboard is not a JSON object")
        return [], []
    if "dashboard" in dashboard and "panels" not in dashboard:
        problems.append("the dashboard is wrapped in {\"dashboard\": ...} (an API payload): "
                        "Import expects the dashboard object itself")
        return [], []
    for key in ("title", "uid"):
        v = dashboard.get(key)
        if not isinstance(v, str) or not v.strip():
            problems.append(f"missing or empty {key!r}")
    uid = dashboard.get("uid")
    if isinstance(uid, str) and (len(uid) > 40 or not re.fullmatch(r"[A-Za-z0-9_-]+", uid)):
        problems.append(f"uid {uid!r} must be 1 to 40 letters, digits, '-' or '_'")
    if not isinstance(dashboard.get("schemaVersion"), int):
        problems.append("missing or non-integer 'schemaVersion'")
    if dashboard.get("id") is not None:
        problems.append("'id' must be null (or absent) so that Import creates a new dashboard")

    # Template variables.
    templating = dashboard.get("templating")
    variables = templating.get("list") if isinstance(templating, dict) else None
    if not isinstance(variables, list):
        problems.append("missing 'templating.list'")
        variables = []
    ds_vars = set()
    var_names = set()
    for v in variables:
        if not isinstance(v, dict) or not v.get("name"):
            problems.append("a template variable without a name")
            continue
        if v["name"] in var_names:
            problems.append(f"template variable {v['name']!r} defined twice")
        var_names.add(v["name"])
        if v.get("type") == "datasource":
            if v.get("query") != "prometheus":
                problems.append(f"datasource variable {v['name']!r} must have query 'prometheus'")
            ds_vars.add(v["name"])
    if not ds_vars:
        problems.append("no datasource template variable (type 'datasource', query 'prometheus')")
    ds_refs = {f"${n}" for n in ds_vars} | {f"${{{n}}}" for n in ds_vars}

    def check_ds(ds, what):
        if ds is None or not ds_vars:  # no variable: reported once above
            return
        uid = ds.get("uid") if isinstance(ds, dict) else ds
        if uid not in ds_refs:
            problems.append(f"{what} uses data source {uid!r}, not a datasource variable "
                            f"({', '.join(sorted(ds_refs))})")

    for v in variables:
        if isinstance(v, dict) and v.get("type") == "query":
            check_ds(v.get("datasource"), f"template variable {v.get('name')!r}")

    # Panels.
    if "panels" not in dashboard:
        problems.append("missing 'panels'")
    panels = all_panels(dashboard.get("panels", []), problems)
    if not any(p.get("type") != "row" for p in panels):
        problems.append("no panels")
    seen = {}
    exprs = []
    for p in panels:
        pid = p.get("id")
        if not isinstance(pid, int) or isinstance(pid, bool):
            problems.append(f"{label(p)}: 'id' must be an integer")
        elif pid in seen:
            problems.append(f"{label(p)}: id {pid} already used by {label(seen[pid])}")
        else:
            seen[pid] = p
        if not p.get("type"):
            problems.append(f"{label(p)}: missing 'type'")
        gp = p.get("gridPos")
        if not isinstance(gp, dict):
            problems.append(f"{label(p)}: missing 'gridPos'")
        else:
            bad = [k for k in ("h", "w", "x", "y")
                   if not isinstance(gp.get(k), int) or isinstance(gp.get(k), bool) or gp[k] < 0]
            if bad:
                problems.append(f"{label(p)}: gridPos {', '.join(bad)} must be non-negative integers")
            elif gp["w"] < 1 or gp["h"] < 1 or gp["x"] + gp["w"] > 24:
                problems.append(f"{label(p)}: gridPos {gp} is outside the 24-column grid")
        if p.get("type") == "row":
            continue
        check_ds(p.get("datasource"), label(p))
        targets = p.get("targets", [])
        if not isinstance(targets, list):
            problems.append(f"{label(p)}: 'targets' is not a list")
            continue
        ref_ids = set()
        for t in targets:
            if not isinstance(t, dict):
                problems.append(f"{label(p)}: a target is not an object")
                continue
            ref = t.get("refId")
            if not ref:
                problems.append(f"{label(p)}: a target without 'refId'")
            elif ref in ref_ids:
                problems.append(f"{label(p)}: refId {ref!r} used twice")
            ref_ids.add(ref)
            check_ds(t.get("datasource"), f"{label(p)} target {ref!r}")
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{label(p)} target {ref!r}: missing 'expr'")
                continue
            exprs.append((f"{label(p)} target {ref!r}", expr))
    for v in variables:
        if isinstance(v, dict) and v.get("type") == "query":
            q = v.get("query")
            if isinstance(q, dict):
                q = q.get("query")
            if isinstance(q, str) and q:
                exprs.append((f"template variable {v.get('name')!r}", q))
    return [p for p in panels if p.get("type") != "row"], exprs


def main(argv):
    if len(argv) not in (2, 3):
        print(f"usage: {argv[0]} DASHBOARD [METRICS_TEXT_FILE]", file=sys.stderr)
        return 2
    problems = []
    try:
        with open(argv[1], encoding="utf-8") as fh:
            dashboard = json.load(fh)
    except (OSError, ValueError) as e:
        print(f"dashboard: cannot read {argv[1]}: {e}", file=sys.stderr)
        return 1

    panels, exprs = check(dashboard, problems)
    used = set()
    for where, expr in exprs:
        # label_values(metric, label) and friends name a metric as their first argument.
        m = re.match(r"\s*(label_values|query_result|series)\s*\((.*)\)\s*$", expr, re.DOTALL)
        if m and m.group(1) == "label_values" and "," in m.group(2):
            expr = m.group(2).rsplit(",", 1)[0]
        elif m and m.group(1) == "label_values":
            continue  # label_values(label): no metric
        elif m:
            expr = m.group(2)
        try:
            names = metric_names(expr)
        except ValueError as e:
            problems.append(f"{where}: cannot read expression: {e}")
            continue
        if not names:
            problems.append(f"{where}: no metric in {expr!r}")
        for name in names:
            why = allowed(name)
            if why:
                problems.append(f"{where}: {name} {why}")
            else:
                used.add(base_name(name))

    if len(argv) == 3:
        try:
            scraped = scraped_names(argv[2])
        except OSError as e:
            problems.append(f"cannot read {argv[2]}: {e}")
            scraped = None
        if scraped is not None:
            missing = sorted(
                b for b in used
                if b not in scraped
                and not any(b + s in scraped for s in HISTOGRAM_SUFFIXES if b in HISTOGRAMS))
            for b in missing:
                problems.append(f"{b} is used by the dashboard but missing from {argv[2]}")

    if problems:
        for p in problems:
            print(f"dashboard: {p}", file=sys.stderr)
        print(f"dashboard: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"dashboard: ok ({len(panels)} panels, {len(used)} metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
