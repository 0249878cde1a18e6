"""Operations files in deploy/: Prometheus rules and scrape config, the Grafana dashboard, the systemd unit.

- ``deploy/prometheus/alerts.yml`` passes ``promtool check rules`` and its unit tests
  (``promtool test rules alerts_test.yml``); ``prometheus.yml`` passes ``promtool check config``.
- Every PromQL query of the dashboard is valid PromQL (checked by promtool as recording rules).
- Every metric name used by the dashboard or the alerts is one the relay exposes on /metrics.
- ``deploy/systemd/viewport-relay.service`` passes ``systemd-analyze verify`` and ``security``,
  and the relay starts with its command line and ``relay.env.example`` and exits by SIGTERM
  within ``TimeoutStopSec``.

promtool comes with Debian's ``prometheus`` package, systemd-analyze with ``systemd``. Without them
these tests are skipped on a developer machine and fail in CI (``CI`` set), where ``.ci/run``
installs them.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from viewport.relay.config import load_config
from viewport.relay.metrics import RelayMetrics

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "viewport-relay.json"
SYSTEMD_DIR = REPO / "deploy" / "systemd"
UNIT = SYSTEMD_DIR / "viewport-relay.service"
ENV_EXAMPLE = SYSTEMD_DIR / "relay.env.example"

#: Names the queries may use that are not the relay's: Prometheus' own scrape health, and the
#: blackbox exporter's result for the /ready probe job (prometheus.yml).
NOT_RELAY_METRICS = {
    "up": "Prometheus: 1 when the /metrics scrape succeeded",
    "probe_success": "blackbox exporter: result of the /ready probe (alerts.yml RelayNotReady)",
}
#: Relay metrics a dashboard or alert may use before RelayMetrics exposes them, while another change
#: adds them: name -> why. Remove an entry once RelayMetrics().render() has the name (the test passes
#: either way). Empty: relay_build_info, the dashboard's Version panel, was listed until it landed.
EXPECTED_SOON: Dict[str, str] = {}

#: What the dashboard must show (issue 9, point 13): at least these metrics appear in its queries.
DASHBOARD_MUST_USE = frozenset({
    "relay_build_info",
    "up",
    "relay_connections_total",
    "relay_workspaces_total",
    "relay_frames_client_to_daemon_total",
    "relay_frames_daemon_to_clients_total",
    "relay_forward_client_to_daemon_seconds_bucket",
    "relay_forward_daemon_to_client_seconds_bucket",
    "relay_admission_ok_total",
    "relay_admission_denied_total",
    "relay_upgrade_rate_limited_total",
    "relay_upgrade_rejected_total_connections_total",
    "relay_upgrade_rejected_ip_connections_total",
    "relay_upgrade_rejected_workspace_clients_total",
    "relay_upgrade_rejected_origin_total",
    "relay_upgrade_invalid_query_total",
    "relay_upgrade_missing_auth_total",
    "relay_ws_slow_client_terminated_total",
    "relay_bus_publish_ok_total",
    "relay_bus_publish_failed_total",
    "relay_bus_pull_ok_total",
    "relay_bus_pull_failed_total",
    "relay_presence_upsert_failed_total",
    "relay_presence_resolve_failed_total",
    "relay_bus_daemon_frames_lost_total",
    "relay_bus_frames_expired_total",
    "relay_remote_relay_dead_total",
})
#: The alerts of issue 9, point 13, by name.
REQUIRED_ALERTS = frozenset({
    "RelayDown",
    "RelayNotReady",
    "RelayBusPullFailing",
    "RelayBusPublishFailing",
    "RelayPresenceFailing",
    "RelaySlowClientCloses",
    "RelayAdmissionFailures",
    "RelayForwardLatencyHighClientToDaemon",
    "RelayForwardLatencyHighDaemonToClient",
})
SEVERITIES = frozenset({"critical", "warning", "info"})


def _tool(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found is None and os.path.exists(f"/usr/bin/{name}"):
        found = f"/usr/bin/{name}"
    return found


PROMTOOL = _tool("promtool")
SYSTEMD_ANALYZE = _tool("systemd-analyze")
IN_CI = bool(os.environ.get("CI"))

#: Skipped on a developer machine without the tool; in CI (which installs it) a missing tool fails.
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not IN_CI,
    reason="promtool is not installed (apt-get install prometheus); .ci/run installs it",
)
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None and not IN_CI,
    reason="systemd-analyze is not installed (apt-get install systemd); .ci/run installs it",
)


def _require(path: Optional[str], package: str) -> str:
    if path is None:
        pytest.fail(f"CI is set but {package}'s tool is missing: apt-get install {package}")
    return path


def _run(argv: List[str], cwd: Optional[Path] = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --- metric names ---------------------------------------------------------------------------------

_PROMQL_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> Set[str]:
    """
    The metric names a PromQL expression selects: identifiers that are neither functions (followed
    by ``(``), keywords, label names (inside ``{}``, ``by (...)`` and the like) nor numbers.
    """
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if text[match.end():].lstrip().startswith("(") or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def exposed_metric_names() -> Set[str]:
    """Every sample name of a fresh relay's /metrics (histograms as _bucket, _sum and _count)."""
    names = set()
    for line in RelayMetrics().render().decode("utf-8").splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def unknown_names(used: Set[str], extra: Set[str]) -> Set[str]:
    """Names in ``used`` that the relay does not expose and that are not allowed in ``extra``."""
    return used - exposed_metric_names() - extra - set(EXPECTED_SOON)


# --- alerts.yml (no YAML library in the test environment: a reader for the rule file's layout) ------


def _block_scalar(lines: List[str], start: int, key_indent: int) -> str:
    """The lines after ``start`` indented deeper than ``key_indent`` (a ``|`` or ``>`` block)."""
    body = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= key_indent:
            break
        body.append(line.strip())
    return "\n".join(body).strip()


def alert_rules() -> List[Dict[str, Any]]:
    """Each ``- alert:`` of alerts.yml: name, expr, for, labels and annotation keys (by layout)."""
    lines = ALERTS.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*- alert:\s*\S", line)]
    rules = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        block = lines[start:end]
        rule: Dict[str, Any] = {"alert": block[0].split("alert:", 1)[1].strip(), "labels": {}, "annotations": set()}
        section = None
        for i, line in enumerate(block):
            match = re.match(r"(\s*)(?:- )?([A-Za-z_]+):\s*(.*)$", line)
            if match is None or line.lstrip().startswith("#"):
                continue
            indent, key, value = len(match.group(1)), match.group(2), match.group(3).strip()
            if key in ("labels", "annotations") and not value:
                section = key
            elif key == "expr":
                rule["expr"] = _block_scalar(block, i, indent) if value[:1] in ("|", ">") else value
                section = None
            elif key == "for":
                rule["for"] = value
                section = None
            elif section == "labels":
                rule["labels"][key] = value.strip("'\"")
            elif section == "annotations":
                rule["annotations"].add(key)
        rules.append(rule)
    return rules


def test_metric_names_parser() -> None:
    """The PromQL name reader finds metrics and skips functions, labels, keywords, numbers and variables."""
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_seconds_bucket{job=~"$job", le!="1e-05"}'
        '[$__rate_interval]))) > 1e-2 and on (instance) group_left (version) b_info'
        " / ignoring(x) (c_total offset 5m) unless bool up == 0 or probe_success"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_info", "c_total", "up", "probe_success"}
    assert metric_names("sum(rate(relay_frames_client_to_daemon_total[5m]))") == {
        "relay_frames_client_to_daemon_total"
    }


def test_exposed_names_include_histogram_series() -> None:
    """The reference list is built from RelayMetrics().render(): histograms appear as their three series."""
    names = exposed_metric_names()
    for suffix in ("_bucket", "_sum", "_count"):
        assert "relay_forward_client_to_daemon_seconds" + suffix in names
    assert "relay_connections_total" in names
    assert unknown_names({"relay_connectoins_total"}, set()) == {"relay_connectoins_total"}


# --- Prometheus -------------------------------------------------------------------------------------


def test_alert_rules_layout() -> None:
    """Every alert has an expression, a for:, a severity label, a summary and a description."""
    rules = alert_rules()
    assert REQUIRED_ALERTS <= {rule["alert"] for rule in rules}
    assert len({rule["alert"] for rule in rules}) == len(rules), "duplicate alert names"
    for rule in rules:
        assert rule.get("expr"), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule['alert']}: for: {rule.get('for')!r}"
        assert rule["labels"].get("severity") in SEVERITIES, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"], rule["alert"]


def test_alert_metrics_exist() -> None:
    """Every metric the alerts read is on the relay's /metrics (or is `up` / the /ready probe's)."""
    used: Set[str] = set()
    for rule in alert_rules():
        used |= metric_names(rule["expr"])
    assert used, "no metric found in alerts.yml"
    assert unknown_names(used, set(NOT_RELAY_METRICS)) == set()


def test_alert_unit_test_series_exist() -> None:
    """The unit tests feed only series the relay (or Prometheus / the probe) really produces."""
    series = re.findall(r"series:\s*'([A-Za-z_:][A-Za-z0-9_:]*)", ALERTS_TEST.read_text(encoding="utf-8"))
    assert series
    assert unknown_names(set(series), set(NOT_RELAY_METRICS)) == set()


@needs_promtool
def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts alerts.yml and counts as many rules as the file has alerts."""
    promtool = _require(PROMTOOL, "prometheus")
    result = _run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout, result.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    """`promtool test rules alerts_test.yml` passes, and it makes at least two alerts fire."""
    promtool = _require(PROMTOOL, "prometheus")
    result = _run([promtool, "test", "rules", ALERTS_TEST.name], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
    firing, current = set(), None
    for line in ALERTS_TEST.read_text(encoding="utf-8").splitlines():
        match = re.search(r"alertname:\s*(\w+)", line)
        if match:
            current = match.group(1)
        if "exp_labels" in line and current:
            firing.add(current)
    assert len(firing) >= 2, firing


@needs_promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    """`promtool check config` accepts prometheus.yml (with its bearer token file present) and its rules."""
    promtool = _require(PROMTOOL, "prometheus")
    text = SCRAPE_CONFIG.read_text(encoding="utf-8")
    token_files = set(re.findall(r"credentials_file:\s*(\S+)", text))
    assert token_files == {"/etc/prometheus/viewport-relay-admin-token"}
    assert "type: Bearer" in text
    token_file = tmp_path / "admin-token"
    token_file.write_text("test-token\n")
    (tmp_path / "prometheus.yml").write_text(text.replace(token_files.pop(), str(token_file)))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    result = _run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout


# --- Grafana --------------------------------------------------------------------------------------------


def _dashboard() -> Dict[str, Any]:
    document: Dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def _panels(dashboard: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries(dashboard: Dict[str, Any]) -> Iterator[Tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} {target.get('refId')}", target.get("expr", "")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", text.strip())
            assert match, f"variable {variable['name']}: {text!r}"
            yield f"variable {variable['name']}", match.group(1)


def test_dashboard_loads_and_every_panel_has_a_query() -> None:
    """The dashboard is JSON with a uid; every panel but rows has a query, on the datasource variable."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "viewport-relay"
    assert dashboard["title"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [panel for panel in _panels(dashboard) if panel["type"] != "row"]
    assert len(panels) >= 10
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        targets = panel.get("targets") or []
        assert targets, f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target {target['refId']}"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    """No two panels share a grid cell."""
    taken: Dict[Tuple[int, int], str] = {}
    for panel in _panels(_dashboard()):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_dashboard_metrics_exist() -> None:
    """Every metric the dashboard queries is on the relay's /metrics (or is `up`), and the required ones are there."""
    used: Set[str] = set()
    for _where, expr in _queries(_dashboard()):
        used |= metric_names(expr)
    assert unknown_names(used, {"up"}) == set()
    assert DASHBOARD_MUST_USE - used == set()


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query parses: promtool checks them as recording rules, Grafana variables filled in."""
    promtool = _require(PROMTOOL, "prometheus")
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, (where, expr) in enumerate(_queries(_dashboard())):
        concrete = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
        concrete = re.sub(r"\$\{?\w+\}?", ".*", concrete)
        assert "$" not in concrete, where
        lines += [f"      - record: dashboard:query_{n}", f"        expr: {json.dumps(concrete)}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = _run([promtool, "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_files() -> None:
    """The provisioning files point at the dashboard directory and a Prometheus data source."""
    provider = (GRAFANA_DIR / "provisioning" / "dashboards" / "viewport-relay.yml").read_text(encoding="utf-8")
    assert "apiVersion: 1" in provider and "type: file" in provider
    assert re.search(r"path:\s*/\S+", provider)
    source = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    assert "apiVersion: 1" in source and "type: prometheus" in source


# --- systemd ---------------------------------------------------------------------------------------------


def unit_settings() -> Dict[str, List[str]]:
    """``Key`` → its values, in order, across the unit's sections (keys are not repeated across sections here)."""
    settings: Dict[str, List[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, value = line.split("=", 1)
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _one(settings: Dict[str, List[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def _environment(settings: Dict[str, List[str]]) -> Dict[str, str]:
    """The unit's ``Environment=NAME=value`` settings (one assignment each here)."""
    pairs = (value.split("=", 1) for value in settings.get("Environment", []))
    return {name: value for name, value in pairs}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", text)
    assert match, text
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[match.group(2)]


def env_example() -> Dict[str, str]:
    """The KEY=VALUE lines of relay.env.example (systemd EnvironmentFile syntax, unquoted here)."""
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            assert not value.startswith(("'", '"')), f"{key}: keep example values unquoted"
            values[key] = value
    return values


def _venv_twistd() -> Path:
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists(), f"{twistd} missing: the test environment must have the project installed"
    return twistd


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart's twistd replaced by this environment's (verify checks the binary exists)."""
    text = UNIT.read_text(encoding="utf-8")
    text, count = re.subn(r"^ExecStart=\S+/twistd ", f"ExecStart={_venv_twistd()} ", text, flags=re.M)
    assert count == 1
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def test_unit_settings() -> None:
    """twistd in the foreground from the venv, non-root, env file, drain on SIGTERM within TimeoutStopSec."""
    settings = unit_settings()
    assert _one(settings, "ExecStart") == "/opt/viewport-relay/venv/bin/twistd --nodaemon --pidfile= viewport-relay"
    assert _one(settings, "User") == "viewport-relay"
    assert _one(settings, "Restart") == "on-failure"
    assert _one(settings, "EnvironmentFile") == "/etc/viewport-relay/relay.env"
    assert _one(settings, "KillSignal") == "SIGTERM"
    assert "143" in _one(settings, "SuccessExitStatus").split()
    grace = load_config({}, home="/nonexistent").heartbeat.shutdown_grace_ms / 1000.0
    stop_timeout = _seconds(_one(settings, "TimeoutStopSec"))
    assert grace + 3 <= stop_timeout <= grace + 30, (grace, stop_timeout)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "StateDirectory": "viewport-relay",
    }.items():
        assert _one(settings, key) == value, key
    environment = _environment(settings)
    assert environment["HOME"] == "/var/lib/viewport-relay"
    assert environment["PYTHONUNBUFFERED"] == "1"


def test_env_example_is_a_valid_configuration() -> None:
    """relay.env.example loads as the relay's configuration; what it writes is in the state directory."""
    values = env_example()
    assert "RELAY_ADMIN_TOKEN" in values and values["RELAY_ADMIN_TOKEN"] == "", "the example must not ship a token"
    config = load_config(dict(values, RELAY_ADMIN_TOKEN=secrets.token_hex(32)), home="/var/lib/viewport-relay")
    assert config.admission.mode == "embedded_secret_file"
    assert config.admission.token_secret_file.startswith("/var/lib/viewport-relay/")
    assert config.http.enable_admin
    stop_timeout = _seconds(_one(unit_settings(), "TimeoutStopSec"))
    assert config.heartbeat.shutdown_grace_ms / 1000.0 + 3 <= stop_timeout


def test_env_example_names_only_documented_variables() -> None:
    """Every variable the example sets or mentions (commented out) is documented."""
    documented = (REPO / "README.md").read_text(encoding="utf-8") + (REPO / "docs" / "backplanes.md").read_text(encoding="utf-8")
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(encoding="utf-8"), flags=re.M))
    assert len(names) >= 10
    assert {name for name in names if name not in documented} == set()


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit, ExecStart pointed at this environment's twistd."""
    tool = _require(SYSTEMD_ANALYZE, "systemd")
    result = _run([tool, "verify", "--man=no", str(_unit_for_this_machine(tmp_path))])
    # Only lines about our unit count; others would be about the host's units.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@needs_systemd_analyze
def test_systemd_analyze_security(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the unit's sandbox 2.0 or better (0 best, 10 worst)."""
    tool = _require(SYSTEMD_ANALYZE, "systemd")
    result = _run([tool, "security", "--offline=yes", "--threshold=20", str(_unit_for_this_machine(tmp_path))])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def _wait_for_line(lines: "queue.Queue[Optional[str]]", event: str, timeout: float) -> Dict[str, Any]:
    """The first JSON log line of ``event`` read from ``lines`` (None marks the end of output)."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        try:
            entry: Dict[str, Any] = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            return entry
    raise AssertionError(f"no {event} line within {timeout} s; output: {''.join(seen)[-3000:]}")


def _read_lines(stream: IO[str], lines: "queue.Queue[Optional[str]]") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _get(url: str, token: Optional[str] = None) -> Tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8")


def test_unit_command_runs_and_stops_by_sigterm(tmp_path: Path) -> None:
    """
    The unit's ExecStart with relay.env.example and the unit's Environment= starts a relay that
    creates its token secret under HOME's stand-in, serves /metrics to the bearer token as
    prometheus.yml scrapes it, and on SIGTERM exits killed by SIGTERM (143) within TimeoutStopSec.
    """
    settings = unit_settings()
    argv = _one(settings, "ExecStart").split()
    argv[0] = str(_venv_twistd())
    admin_token = secrets.token_hex(32)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env.update(_environment(settings))
    env.update(env_example())
    # Stand-ins for the state directory, a free port and a filled-in admin token.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env.update(
        HOME=str(state),
        PORT="0",
        RELAY_TOKEN_SECRET_FILE=str(state / "relay-token-secret"),
        RELAY_ADMIN_TOKEN=admin_token,
    )
    process = subprocess.Popen(argv, env=env, cwd=state, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        url = _wait_for_line(lines, "relay_listening", 30)["details"]["url"]
        base = url.replace("ws://", "http://").rsplit("/ws", 1)[0]
        status, body = _get(base + "/metrics", admin_token)
        assert status == 200 and "relay_connections_total" in body, (status, body[:300])
        assert _get(base + "/metrics")[0] == 401
        assert _get(base + "/ready")[0] == 200
        secret = state / "relay-token-secret"
        assert secret.exists() and stat.S_IMODE(secret.stat().st_mode) == 0o600
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=_seconds(_one(settings, "TimeoutStopSec")))
        assert time.monotonic() - started < _seconds(_one(settings, "TimeoutStopSec"))
        # Killed by SIGTERM (twistd re-raises it): 143 in a shell, clean for systemd.
        assert process.returncode == -signal.SIGTERM, process.returncode
        _wait_for_line(lines, "relay_stopped", 5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        process.stdout.close()
