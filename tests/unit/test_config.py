"""The topology file and per-process settings (docs/design.md §2): one line per problem, with its path."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from replicatord.config import (
    ConfigError,
    Topology,
    load_topology,
    parse_listen,
    parse_topology,
    resolve_settings,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "local.yaml"
CN = "cn-north-1"
SG = "ap-southeast-1"
SOURCE = "topo.yaml"


def example_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


def topology() -> Topology:
    return parse_topology(EXAMPLE.read_text(), str(EXAMPLE))


@pytest.fixture(autouse=True)
def _no_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REPLICATORD_REGION", "REPLICATORD_INSTANCE_ID", "REPLICATORD_METRICS_LISTEN"):
        monkeypatch.delenv(name, raising=False)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_topology(text, SOURCE)
    lines = raised.value.lines
    assert lines, "at least one problem"
    for line in lines:
        assert "\n" not in line, f"not one line: {line!r}"
        assert line.startswith(f"{SOURCE}: "), f"does not name the file: {line!r}"
    assert str(raised.value) == "\n".join(lines)
    return lines


# --- the example -----------------------------------------------------------------------------


def test_example_parses() -> None:
    topo = topology()
    assert list(topo.regions) == [CN, SG]
    cn = topo.regions[CN]
    assert cn.endpoint_url == "http://127.0.0.1:5101"
    assert cn.credentials is not None
    assert cn.credentials.ssm_prefix == "/DDBReplication/TableCN/"
    assert cn.proxy is None
    assert cn.dead_letter_queue == "ddbreplicatorcn"
    assert (cn.lease_table, cn.stats_table, cn.loader_stats_table) == (
        "replicatord_leases_v2", "replicator_stats", "loader_stats",
    )
    (pair,) = topo.pairs
    assert pair.name == "user"
    assert pair.tables == {CN: "user-cn", SG: "user-sg"}
    assert pair.streams == {CN: "ddb_replication_stream_cn", SG: "ddb_replication_stream_sg"}
    assert pair.key == {"PK": "S"}
    assert topo.conflict.timestamp_attribute == "last_update_timestamp"
    assert topo.conflict.region_attribute == "last_updater_region"
    assert topo.conflict.marker_attribute == "replicatord:deleting"
    assert topo.metrics.listen == "127.0.0.1:9108"


def test_load_topology_reads_the_file() -> None:
    assert load_topology(EXAMPLE) == topology()


def test_load_topology_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as raised:
        load_topology(missing)
    (line,) = raised.value.lines
    assert str(missing) in line
    assert "cannot read" in line


def test_minimal_document_takes_defaults() -> None:
    text = """
regions:
  a: {dead_letter_queue: dlq-a}
  b: {dead_letter_queue: dlq-b}
pairs:
  - {name: t, tables: {a: ta, b: tb}, streams: {a: sa, b: sb}}
"""
    topo = parse_topology(text)
    assert topo.regions["a"].credentials is None
    assert topo.regions["a"].lease_table == "replicatord_leases_v2"
    assert topo.pairs[0].kinesis_shards == 1
    assert topo.metrics.listen == "0.0.0.0:9108"
    assert topo.tuning.backoff_max_ms >= topo.tuning.backoff_base_ms


def test_three_region_mesh() -> None:
    doc = example_doc()
    doc["regions"]["us-east-1"] = {"dead_letter_queue": "dlq-us"}
    doc["pairs"][0]["tables"]["us-east-1"] = "user-us"
    doc["pairs"][0]["streams"]["us-east-1"] = "stream-us"
    topo = parse_topology(yaml.safe_dump(doc))
    assert len(topo.regions) == 3


def test_topology_is_frozen() -> None:
    topo = topology()
    with pytest.raises(ValueError, match="frozen"):
        topo.regions[CN].dead_letter_queue = "x"  # type: ignore[misc]


# --- errors ----------------------------------------------------------------------------------

Edit = Callable[[dict[str, Any]], Any]


def edited(edit: Edit) -> str:
    doc = example_doc()
    result = edit(doc)
    return yaml.safe_dump(result if result is not None else doc)


def _set(path: str, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value

    return edit


def _drop(path: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        del target[last]

    return edit


def _rename(path: str, old: str, new: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        target: Any = doc
        for part in path.split("/"):
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[new] = target.pop(old)

    return edit


def _duplicate_pair(doc: dict[str, Any]) -> None:
    doc["pairs"].append(copy.deepcopy(doc["pairs"][0]))


def _only_cn(doc: dict[str, Any]) -> None:
    del doc["regions"][SG]
    for pair in doc["pairs"]:
        del pair["tables"][SG]
        del pair["streams"][SG]


ERROR_CASES: list[tuple[str, Edit, list[str]]] = [
    ("unknown_top_level", _set("regionz", {}), ["regionz", "unknown key"]),
    (
        "unknown_nested",
        _rename(f"regions/{CN}", "endpoint_url", "endpoint_urll"),
        [f"regions.{CN}.endpoint_urll", "unknown key"],
    ),
    ("unknown_in_pair", _set("pairs/0/table", "x"), ["pairs[0].table", "unknown key"]),
    ("unknown_in_conflict", _set("conflict/marker", "x"), ["conflict.marker", "unknown key"]),
    (
        "unknown_in_credentials",
        _set(f"regions/{SG}/credentials/secret_key", "x"),
        [f"regions.{SG}.credentials.secret_key", "unknown key"],
    ),
    ("wrong_type_shards", _set("pairs/0/kinesis_shards", "many"), ["pairs[0].kinesis_shards", "integer"]),
    ("shards_out_of_range", _set("pairs/0/kinesis_shards", 0), ["pairs[0].kinesis_shards", "1"]),
    ("wrong_type_tables", _set("pairs/0/tables", "user-cn"), ["pairs[0].tables", "dictionary"]),
    ("wrong_type_regions", _set("regions", ["cn"]), ["regions", "dictionary"]),
    ("wrong_type_tuning", _set("tuning", {"poll_interval_ms": "fast"}), ["tuning.poll_interval_ms", "integer"]),
    (
        "missing_dead_letter_queue",
        _drop(f"regions/{CN}/dead_letter_queue"),
        [f"regions.{CN}.dead_letter_queue", "required"],
    ),
    ("missing_regions", _drop("regions"), ["regions", "required"]),
    ("missing_pairs", _drop("pairs"), ["pairs", "required"]),
    ("empty_pairs", _set("pairs", []), ["pairs", "at least 1"]),
    ("pair_tables_missing_region", _drop(f"pairs/0/tables/{SG}"), ["pairs[0].tables", "missing", SG]),
    ("pair_streams_missing_region", _drop(f"pairs/0/streams/{CN}"), ["pairs[0].streams", "missing", CN]),
    (
        "pair_unknown_region",
        _set("pairs/0/tables/eu-west-1", "user-eu"),
        ["pairs[0].tables", "unknown regions", "eu-west-1"],
    ),
    ("one_region", _only_cn, ["regions", "at least two regions"]),
    ("duplicate_pair_names", _duplicate_pair, ["pairs[1].name", "duplicate", "user"]),
    ("bad_pair_name", _set("pairs/0/name", "user table"), ["pairs[0].name"]),
    ("bad_key_type", _set("pairs/0/key", {"PK": "X"}), ["pairs[0].key.PK"]),
    ("three_key_attributes", _set("pairs/0/key", {"a": "S", "b": "S", "c": "N"}), ["pairs[0]", "key"]),
    (
        "ssm_prefix_not_absolute",
        _set(f"regions/{CN}/credentials/ssm_prefix", "DDBReplication/TableCN/"),
        [f"regions.{CN}.credentials.ssm_prefix", "pattern"],
    ),
    (
        "ssm_prefix_empty",
        _set(f"regions/{CN}/credentials/ssm_prefix", ""),
        [f"regions.{CN}.credentials.ssm_prefix"],
    ),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_topology_errors(edit: Edit, expected: list[str]) -> None:
    lines = errors_of(edited(edit))
    assert any(all(part in line for part in expected) for line in lines), lines


@pytest.mark.parametrize(
    ("text", "line_number"),
    [
        ("regions:\n  cn: {dead_letter_queue: x\npairs: []\n", 3),
        ("regions:\n  a: b: c\n", 2),
        ("\tregions: {}\n", 1),
        ("regions: {}\npairs: [\n", 3),
    ],
    ids=["unclosed_flow", "nested_colon", "tab", "unclosed_list"],
)
def test_invalid_yaml_names_the_line(text: str, line_number: int) -> None:
    (line,) = errors_of(text)
    assert "invalid YAML" in line
    assert f"line {line_number}" in line


@pytest.mark.parametrize(
    "text",
    ["- regions\n- pairs\n", "just a string\n", "42\n", "", "# only a comment\n"],
    ids=["list", "string", "number", "empty", "comment"],
)
def test_top_level_must_be_a_mapping(text: str) -> None:
    (line,) = errors_of(text)
    assert "mapping at the top level" in line


def test_every_problem_is_its_own_line() -> None:
    def several(doc: dict[str, Any]) -> None:
        doc["bogus"] = 1
        doc["regions"][CN]["endpoint_urll"] = "x"
        doc["pairs"][0]["kinesis_shards"] = "many"
        del doc["regions"][SG]["dead_letter_queue"]

    lines = errors_of(edited(several))
    assert len(lines) == 4
    joined = "\n".join(lines)
    for part in ("bogus", f"regions.{CN}.endpoint_urll", "pairs[0].kinesis_shards", f"regions.{SG}.dead_letter_queue"):
        assert part in joined


def test_secrets_are_not_accepted_in_the_file() -> None:
    lines = errors_of(edited(_set(f"regions/{CN}/credentials/secret_access_key", "s3cr3t")))
    assert all("s3cr3t" not in line for line in lines)


# --- per-process settings ----------------------------------------------------------------------


def test_region_from_argument() -> None:
    settings = resolve_settings(topology(), CN)
    assert settings.region == CN
    assert settings.me == topology().regions[CN]
    assert settings.peers == [SG]


def test_region_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATORD_REGION", SG)
    settings = resolve_settings(topology(), None)
    assert settings.region == SG
    assert settings.peers == [CN]


def test_region_argument_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATORD_REGION", SG)
    assert resolve_settings(topology(), CN).region == CN


@pytest.mark.parametrize("env", [None, ""], ids=["unset", "empty"])
def test_missing_region(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    if env is not None:
        monkeypatch.setenv("REPLICATORD_REGION", env)
    with pytest.raises(ConfigError) as raised:
        resolve_settings(topology(), None)
    (line,) = raised.value.lines
    assert "--region" in line
    assert "REPLICATORD_REGION" in line


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_unknown_region_lists_known_ones(monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    if source == "environment":
        monkeypatch.setenv("REPLICATORD_REGION", "eu-west-1")
    with pytest.raises(ConfigError) as raised:
        resolve_settings(topology(), "eu-west-1" if source == "argument" else None)
    (line,) = raised.value.lines
    assert "\n" not in line
    assert "eu-west-1" in line
    assert CN in line and SG in line


def test_instance_id(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_settings(topology(), CN, instance_id="i-1").instance_id == "i-1"
    assert str(os.getpid()) in resolve_settings(topology(), CN).instance_id
    monkeypatch.setenv("REPLICATORD_INSTANCE_ID", "from-env")
    assert resolve_settings(topology(), CN).instance_id == "from-env"
    assert resolve_settings(topology(), CN, instance_id="i-2").instance_id == "i-2"


def test_metrics_listen_from_file() -> None:
    settings = resolve_settings(topology(), CN)
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9108)


def test_metrics_listen_from_argument_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = resolve_settings(topology(), CN, metrics_listen="0.0.0.0:0")
    assert (settings.metrics_host, settings.metrics_port) == ("0.0.0.0", 0)
    monkeypatch.setenv("REPLICATORD_METRICS_LISTEN", "127.0.0.2:9200")
    settings = resolve_settings(topology(), CN)
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.2", 9200)
    settings = resolve_settings(topology(), CN, metrics_listen="localhost:9300")
    assert (settings.metrics_host, settings.metrics_port) == ("localhost", 9300)


BAD_LISTEN = ["9108", ":9108", "host:", "host:port", "host:70000", "host:-1", "host:9108x", "host: 9108"]


@pytest.mark.parametrize("value", BAD_LISTEN)
def test_bad_metrics_listen_argument(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_settings(topology(), CN, metrics_listen=value)
    (line,) = raised.value.lines
    assert "--metrics-listen" in line
    assert "HOST:PORT" in line
    assert repr(value) in line


def test_bad_metrics_listen_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATORD_METRICS_LISTEN", "nope")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        resolve_settings(topology(), CN)


def test_bad_metrics_listen_in_file_names_the_field() -> None:
    topo = parse_topology(edited(_set("metrics/listen", "9108")))
    with pytest.raises(ConfigError) as raised:
        resolve_settings(topo, CN)
    (line,) = raised.value.lines
    assert line.startswith("metrics.listen:")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.0.0.0:9108", ("0.0.0.0", 9108)), ("[::1]:80", ("[::1]", 80)), ("h:65535", ("h", 65535)), ("h:0", ("h", 0))],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value, "x") == expected


def test_parse_listen_superscript_digit_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_listen("host:²", "--metrics-listen")


def test_duplicate_yaml_key_is_an_error() -> None:
    text = EXAMPLE.read_text().replace("conflict:", "metrics:\n  listen: 10.0.0.1:1\nconflict:", 1)
    lines = errors_of(text)
    assert any("metrics" in line and "duplicate" in line for line in lines)


def test_the_proxy_password_comes_from_the_environment_file_not_the_topology() -> None:
    from replicatord.config import ConfigError, Region, proxy_password_in_file, proxy_with_password

    region = Region(proxy="http://replicatord@squid.internal:3128", proxy_password_env="REPLICATORD_PROXY_PASSWORD",
                    dead_letter_queue="q")
    assert proxy_with_password("ap-southeast-1", region, {"REPLICATORD_PROXY_PASSWORD": "p@ss:w/rd"}) == \
        "http://replicatord:p%40ss%3Aw%2Frd@squid.internal:3128"
    with pytest.raises(ConfigError, match="REPLICATORD_PROXY_PASSWORD is not set"):
        proxy_with_password("ap-southeast-1", region, {})
    with pytest.raises(ConfigError, match="give the user and no password"):
        proxy_with_password("ap-southeast-1", Region(proxy="http://u:p@h:1", proxy_password_env="X",
                                                     dead_letter_queue="q"), {"X": "y"})
    assert proxy_with_password("x", Region(proxy="http://h:1", dead_letter_queue="q"), {}) == "http://h:1"
    assert proxy_password_in_file(Region(proxy="http://u:secret@h:1", dead_letter_queue="q"))
    assert not proxy_password_in_file(region)


def test_check_config_warns_of_a_password_in_the_topology(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from replicatord import cli

    doc = yaml.safe_load((EXAMPLE.parent / "replicatord.example.yaml").read_text())
    doc["regions"]["ap-southeast-1"]["proxy"] = "http://replicatord:hunter2@10.0.0.5:3128"
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["check-config", "--config", str(path), "--region", "cn-north-1"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "regions.ap-southeast-1.proxy holds a password" in warnings[0]
    assert "hunter2" not in captured.out + captured.err


@pytest.mark.parametrize("text", [
    "? [1, 2]\n: x\n",
    "regions:\n  ? [a]\n  : {}\n",
    "? {a: 1}\n: x\n",
    "[" * 10000,
    "{a: " * 5000,
    "a: &x [1, 2]\nb: [*x, *x]\n",  # aliases: an alias bomb starts like this
    "regions: !!float nan-ish\n",
    "regions: !!int 0x\n",
    "regions: !!timestamp 2020-13-45\n",
    "\x00\x01",
    "regions: {cn-north-1: {dead_letter_queue: q}, x: {dead_letter_queue: q}}\n"
    "pairs: [{name: p, tables: 5, streams: []}]",
])
def test_a_malformed_topology_is_one_line_never_a_traceback(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_topology(text, "t.yaml")
    assert raised.value.lines and all("\n" not in line and line.startswith("t.yaml: ") for line in raised.value.lines)


yaml_like = st.lists(st.sampled_from(list("{}[]:,-?&*!|>'\"#% \n\tax1.") + ["regions", "pairs", ": ", "!!binary "]),
                     max_size=120).map("".join)


@given(yaml_like)
def test_any_text_is_a_topology_or_one_line_per_problem(text: str) -> None:
    try:
        parse_topology(text, "t.yaml")
    except ConfigError as exc:
        assert exc.lines and all("\n" not in line for line in exc.lines)


def test_an_unreadable_or_malformed_file_exits_3_with_one_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from replicatord import cli

    path = tmp_path / "topology.yaml"
    path.write_text("? [a, b]\n: c\n")
    assert cli.main(["check-config", "--config", str(path), "--region", "cn-north-1"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "a key must be a name" in err[0], err
