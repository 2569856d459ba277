"""Deployment specs (deploy/datacrunch/*.yaml) and ``gpuscale deploy apply`` against the emulator.

Each spec must be exactly the API's Deployment shape: it is loaded into the official SDK's
``Deployment`` dataclass and every key of the file must survive the round trip (the SDK silently
drops unknown keys, so an unknown field would vanish and fail the comparison).  ``deploy apply``
runs as the real command line against the emulator: it creates, then changes nothing when equal,
shows a diff and updates, never touches the controller's replica counts, and rejects bad files
with exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from verda.containers._containers import Deployment

from gpuscale.controller import deployspec
from gpuscale.controller.pools import load_pools
from gpuscale.dev.emulator import Emulator, EmulatorConfig

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "deploy" / "datacrunch").glob("*.yaml"))
DEPLOYMENT_SPECS = [p for p in SPECS if p.name != "pools.yaml"]


def assert_kept(original: Any, roundtrip: Any, path: str = "") -> None:
    """Every key and value of ``original`` is present, unchanged, in ``roundtrip``."""
    if isinstance(original, dict):
        assert isinstance(roundtrip, dict), f"{path}: became {type(roundtrip).__name__}"
        for key, value in original.items():
            assert key in roundtrip, f"{path}.{key}: dropped by the SDK (not a Deployment field)"
            assert_kept(value, roundtrip[key], f"{path}.{key}")
    elif isinstance(original, list):
        assert isinstance(roundtrip, list) and len(roundtrip) == len(original), f"{path}: list changed"
        for i, (a, b) in enumerate(zip(original, roundtrip, strict=True)):
            assert_kept(a, b, f"{path}[{i}]")
    else:
        assert roundtrip == original, f"{path}: {original!r} became {roundtrip!r}"


def first_doc(name: str) -> Any:
    """The first (preferred) deployment of a shipped spec file, as raw YAML."""
    return next(d for d in yaml.safe_load_all((ROOT / "deploy" / "datacrunch" / name).read_text()) if d)


def test_both_pools_have_a_spec_named_like_their_pool_rules() -> None:
    assert {p.name for p in DEPLOYMENT_SPECS} >= {"visual.yaml", "text.yaml"}
    config = load_pools(ROOT / "deploy" / "datacrunch" / "pools.yaml")
    for pool in ("visual", "text"):
        # Every fallback deployment of the pool, in the pool's order, in the pool's own file.
        names = [d["name"] for d in deployspec.load_all(ROOT / "deploy" / "datacrunch" / f"{pool}.yaml")]
        assert names == [o.name for o in config.pools[pool].options]
        assert len(names) == 3 and config.pools[pool].options[0].spot


@pytest.mark.parametrize("path", DEPLOYMENT_SPECS, ids=lambda p: p.name)
def test_spec_is_exactly_the_sdk_deployment_shape(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == len(deployspec.load_all(path))  # and our own strict loader agrees
    for raw in docs:
        raw = deployspec.without_private(raw)  # _replica_slots is gpuscale's, never sent
        sdk = Deployment.from_dict(raw)
        assert_kept(raw, sdk.to_dict())
        # The shared filesystem is mounted, its volume id filled in by `deploy apply`.
        (mount,) = [m for m in sdk.containers[0].volume_mounts if m.type == "shared"]
        assert (mount.mount_path, mount.volume_id) == ("/mnt/shared", deployspec.VOLUME_PLACEHOLDER)


@pytest.mark.parametrize(
    ("path", "gpu", "pool"),
    [("visual.yaml", "H100", "visual"), ("text.yaml", "A100", "text")],
)
def test_spec_contents(path: str, gpu: str, pool: str) -> None:
    specs = deployspec.load_all(ROOT / "deploy" / "datacrunch" / path)
    spec = specs[0]
    assert spec["is_spot"] is True and [s["is_spot"] for s in specs[1:]] == [False, False]
    (container,) = spec["containers"]
    assert container["exposed_port"] == 8001
    assert container["healthcheck"] == {"enabled": True, "port": 8001, "path": "/api/health"}
    env = {e["name"]: e for e in container["env"]}
    assert env["GPUSCALE_POOL"] == {
        "name": "GPUSCALE_POOL",
        "value_or_reference_to_secret": pool,
        "type": "plain",
    }
    for secret in ("GPUSCALE_DATABASE_URL", "GPUSCALE_WORKER_TOKEN"):
        assert env[secret]["type"] == "secret"  # by reference, never the value
        assert "://" not in env[secret]["value_or_reference_to_secret"]
    assert spec["compute"] == {"name": gpu, "size": 1}
    assert spec["scaling"]["min_replica_count"] == 0
    assert env["GPUSCALE_DOCUMENT_ROOT"]["value_or_reference_to_secret"] == "/mnt/shared/uploads"
    # Fallbacks differ only in name, GPU and spot.
    for other in specs[1:]:
        assert other["containers"] == spec["containers"] and other["scaling"] == spec["scaling"]


def test_an_unknown_field_fails(tmp_path: Path) -> None:
    raw = deployspec.without_private(first_doc("visual.yaml"))
    raw["containers"][0]["helthcheck"] = {"enabled": True}
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(AssertionError, match="helthcheck"):
        assert_kept(raw, Deployment.from_dict(raw).to_dict())
    with pytest.raises(deployspec.SpecError, match=r"typo.yaml: containers\[0\]\.helthcheck: unknown field"):
        deployspec.load_file(bad)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("compute"), "compute: required"),
        (lambda d: d["containers"][0].update(exposed_port="8001"), "exposed_port: expected an integer"),
        (lambda d: d["containers"][0]["env"][0].update(type="clear"), "must be 'plain' or 'secret'"),
        (lambda d: d["scaling"].update(min_replica_count=9), "min_replica_count <= max_replica_count"),
        (lambda d: d.update(name="Deck Visual"), "not a valid deployment name"),
    ],
)
def test_bad_specs_say_what_is_wrong(tmp_path: Path, mutate: Any, message: str) -> None:
    raw = first_doc("visual.yaml")
    mutate(raw)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(deployspec.SpecError, match=message):
        deployspec.load_file(bad)


def test_diff_ignores_defaults_read_only_fields_and_replica_counts() -> None:
    spec = deployspec.load_file(ROOT / "deploy" / "datacrunch" / "visual.yaml")
    live = {
        **spec,
        "created_at": "2026-01-01T00:00:00Z",
        "endpoint_base_url": "https://x",
        "scaling": {**spec["scaling"], "min_replica_count": 2, "max_replica_count": 2},
    }
    live["containers"] = [{**spec["containers"][0], "name": "deck-visual-0"}]
    live["compute"] = {**spec["compute"], "is_available": True}
    assert deployspec.diff(live, spec) == []
    changed = {**spec, "compute": {"name": "H200", "size": 1}}
    assert deployspec.diff(live, changed) == [("compute.name", "H100", "H200")]
    body = deployspec.update_body(live, changed)
    assert body["scaling"]["min_replica_count"] == 2 and body["compute"]["name"] == "H200"
    assert body["containers"][0]["name"] == "deck-visual-0"
    deployspec.validate(body)  # still exactly the API's shape


# ---------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(
        EmulatorConfig(cold_start_s=0.1, grace_s=1.0, tick_s=0.02, default_command="true")
    ) as emulator:
        yield emulator


def apply(
    emu: Emulator, *args: str | Path, env_extra: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    env: dict[str, str | None] = {
        **os.environ,
        "DATACRUNCH_BASE_URL": emu.base_url,
        "DATACRUNCH_CLIENT_ID": emu.client_id,
        "DATACRUNCH_CLIENT_SECRET": emu.client_secret,
        "GPUSCALE_SHARED_VOLUME_ID": "3f2c1b8e-sfs-uploads",
        **(env_extra or {}),
    }
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "deploy", "apply", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def writes(emu: Emulator) -> int:
    return int(emu.snapshot()["writes"])


def test_apply_creates_then_changes_nothing(emu: Emulator) -> None:
    files = [ROOT / "deploy" / "datacrunch" / "visual.yaml", ROOT / "deploy" / "datacrunch" / "text.yaml"]
    dry = apply(emu, *files, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "gpuscale-visual-r00: create" in dry.stdout and "dry run" in dry.stdout
    assert "gpuscale-visual-r13: create from" in dry.stdout and ", as gpuscale-visual-r00" in dry.stdout
    assert "+ compute.name = 'H100'" in dry.stdout
    assert not emu.snapshot()["deployments"]

    created = apply(emu, *files)
    assert created.returncode == 0, created.stderr
    made = set(emu.snapshot()["deployments"])
    # One DataCrunch deployment per replica slot (_replica_slots in the specs), nothing else.
    visual = {f"gpuscale-visual{v}-r{i:02d}" for v in ("-spot", "", "-a100") for i in range(14)}
    text = {f"gpuscale-text{v}-r{i:02d}" for v in ("-spot", "", "-l40s") for i in range(8)}
    assert made == visual | text
    state = emu.state
    assert state is not None
    spot = state.deployments["gpuscale-visual-spot-r03"].spec
    assert spot["is_spot"] is True
    assert (spot["scaling"]["min_replica_count"], spot["scaling"]["max_replica_count"]) == (0, 1)
    assert {"type": "shared", "mount_path": "/mnt/shared", "volume_id": "3f2c1b8e-sfs-uploads"} in spot[
        "containers"
    ][0]["volume_mounts"]

    before = writes(emu)
    again = apply(emu, *files)
    assert again.returncode == 0, again.stderr
    assert "gpuscale-visual: 14 of 14 slot(s) unchanged" in again.stdout
    assert "gpuscale-text-l40s: 8 of 8 slot(s) unchanged" in again.stdout
    assert writes(emu) == before  # nothing was written
    for name in made:  # the later tests share the emulator
        _admin(emu, "DELETE", f"/container-deployments/{name}")


def test_apply_updates_with_a_diff_and_keeps_the_replica_counts(emu: Emulator, tmp_path: Path) -> None:
    raw = first_doc("text.yaml")
    raw["name"] = "deck-text-update"
    del raw[deployspec.SLOTS_KEY]  # a plain deployment: the one DataCrunch deployment
    first = tmp_path / "text.yaml"
    first.write_text(yaml.safe_dump(raw))
    assert apply(emu, first).returncode == 0
    # The controller pins the count meanwhile.
    pinned = {**raw["scaling"], "min_replica_count": 2, "max_replica_count": 2}
    _admin_patch_scaling(emu, "deck-text-update", pinned)

    raw["compute"]["name"] = "H100"
    raw["containers"][0]["image"] = "registry.example.com/gpuscale/text:0.2.0"
    first.write_text(yaml.safe_dump(raw))
    dry = apply(emu, first, "--dry-run")
    assert "update, 2 change(s)" in dry.stdout
    assert "~ compute.name: 'A100' -> 'H100'" in dry.stdout
    assert "~ containers[0].image: 'registry.example.com/gpuscale/text:0.1.0' -> " in dry.stdout
    assert emu.snapshot()["deployments"]["deck-text-update"]["scaling"]["min_replica_count"] == 2

    updated = apply(emu, first)
    assert updated.returncode == 0, updated.stderr
    state = emu.snapshot()["deployments"]["deck-text-update"]
    assert state["scaling"] == {"min_replica_count": 2, "max_replica_count": 2}  # left to the controller
    assert "unchanged" in apply(emu, first).stdout


def _admin_patch_scaling(emu: Emulator, name: str, scaling: dict[str, Any]) -> None:
    _admin(emu, "PATCH", f"/container-deployments/{name}/scaling", scaling)


def _admin(emu: Emulator, method: str, path: str, body: Any = None) -> None:
    token = httpx.post(
        f"{emu.base_url}/oauth2/token",
        json={
            "grant_type": "client_credentials",
            "client_id": emu.client_id,
            "client_secret": emu.client_secret,
        },
    ).json()["access_token"]
    answer = httpx.request(
        method, f"{emu.base_url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code < 300, answer.text


def test_apply_rejects_bad_files_with_exit_2(emu: Emulator, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: deck-x\ncontainers: []\ncompute: {name: H100, size: 1}\nbogus: 1\n")
    result = apply(emu, bad)
    assert result.returncode == 2
    assert "bad.yaml: bogus: unknown field" in result.stderr
    assert apply(emu, tmp_path / "missing.yaml").returncode == 2
    assert "deck-x" not in emu.snapshot()["deployments"]


def test_apply_reports_api_errors(emu: Emulator, tmp_path: Path) -> None:
    raw = first_doc("visual.yaml")
    raw["name"] = "deck-tpu"
    raw["compute"]["name"] = "TPUv9"
    spec = tmp_path / "tpu.yaml"
    spec.write_text(yaml.safe_dump(raw))
    result = apply(emu, spec)
    assert result.returncode == 1
    assert "TPUv9" in result.stderr and emu.client_secret not in result.stderr + result.stdout


def test_apply_refuses_the_volume_placeholder_unfilled(emu: Emulator) -> None:
    before = writes(emu)
    result = apply(
        emu, ROOT / "deploy" / "datacrunch" / "text.yaml", env_extra={"GPUSCALE_SHARED_VOLUME_ID": None}
    )
    assert result.returncode == 2
    assert "volume_mounts[0].volume_id is ${GPUSCALE_SHARED_VOLUME_ID}" in result.stderr
    assert "GPUSCALE_SHARED_VOLUME_ID" in result.stderr and writes(emu) == before


def test_a_list_of_deployments_in_one_file(tmp_path: Path) -> None:
    one, two = first_doc("visual.yaml"), first_doc("visual.yaml")
    two["name"] = "deck-second"
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump([one, two]))
    assert [d["name"] for d in deployspec.load_all(listed)] == ["gpuscale-visual-spot", "deck-second"]
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump_all([one, one]))
    with pytest.raises(deployspec.SpecError, match="defined twice"):
        deployspec.load_all(twice)
    bad = tmp_path / "bad.yaml"
    two["containers"][0]["volume_mounts"][0]["volume_id"] = None
    bad.write_text(yaml.safe_dump_all([one, two]))
    with pytest.raises(deployspec.SpecError, match=r"deployment #2: .*volume_id: a shared mount needs"):
        deployspec.load_all(bad)


def test_apply_needs_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATACRUNCH_")}
    env["GPUSCALE_SHARED_VOLUME_ID"] = "sfs-1"
    result = subprocess.run(
        [sys.executable, "-m", "gpuscale.cli", "deploy", "apply", str(DEPLOYMENT_SPECS[0])],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "DATACRUNCH_CLIENT_ID" in result.stderr


# ---------------------------------------------------------------------- replica slots


def test_slots_expand_into_one_deployment_per_replica() -> None:
    spec = deployspec.load_all(ROOT / "deploy" / "datacrunch" / "text.yaml")[1]
    assert spec[deployspec.SLOTS_KEY] == 8
    slots = deployspec.expand(spec)
    assert [s["name"] for s in slots] == [f"gpuscale-text-r{i:02d}" for i in range(8)]
    for item in slots:
        assert deployspec.SLOTS_KEY not in item  # never sent to the API
        assert (item["scaling"]["min_replica_count"], item["scaling"]["max_replica_count"]) == (0, 1)
        deployspec.validate(item, ignore_private=False)
        assert deployspec.diff(slots[0], {**item, "name": slots[0]["name"]}) == []  # identical but the name
    plain = {k: v for k, v in spec.items() if k != deployspec.SLOTS_KEY}
    assert deployspec.expand(plain) == [plain]
    assert deployspec.slot_name("deck", 3) == "deck-r03" and deployspec.slot_name("deck", 120) == "deck-r120"
    assert deployspec.parse_slot_name("gpuscale-text-r05") == ("gpuscale-text", 5)
    assert deployspec.parse_slot_name("deck-r120") == ("deck", 120)
    for name in ("gpuscale-text", "deck-r5", "deck-r007", "r00", "deck-r0a"):
        assert deployspec.parse_slot_name(name) is None, name


@pytest.mark.parametrize(
    ("value", "name", "message"),
    [
        (0, "deck", "_replica_slots: must be an integer >= 1, got 0"),
        (True, "deck", "_replica_slots: must be an integer >= 1, got True"),
        ("4", "deck", "_replica_slots: must be an integer >= 1, got '4'"),
        (2, "d" * 62, r"_replica_slots: slot name 'd{62}-r01' is not a valid deployment name"),
    ],
)
def test_bad_slot_counts_say_what_is_wrong(tmp_path: Path, value: Any, name: str, message: str) -> None:
    raw = first_doc("visual.yaml")
    raw["name"], raw[deployspec.SLOTS_KEY] = name, value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(deployspec.SpecError, match=f"bad.yaml: {message}"):
        deployspec.load_all(bad)
    raw[deployspec.SLOTS_KEY] = 1
    raw["_replica_slot"] = 2  # a typo of gpuscale's own key fails like any other
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(deployspec.SpecError, match="_replica_slot: unknown field"):
        deployspec.load_all(bad)


def test_shipped_slots_cover_the_pools_max_replicas() -> None:
    """A pool whose rules count on stopping the idle replica (scale_down_victims: idle) needs a
    slot per replica on every deployment; the shipped specs have them whatever the rules say."""
    config = load_pools(ROOT / "deploy" / "datacrunch" / "pools.yaml")
    for pool, rules in config.pools.items():
        specs = {s["name"]: s for s in deployspec.load_all(ROOT / "deploy" / "datacrunch" / f"{pool}.yaml")}
        for option in rules.options:
            slots = deployspec.replica_slots(specs[option.name])
            assert slots is not None and slots >= rules.max_replicas, (pool, option.name, slots)


def test_apply_sees_slot_names_clash_and_a_plain_deployment_left(emu: Emulator, tmp_path: Path) -> None:
    slotted = first_doc("visual.yaml")
    slotted["name"], slotted[deployspec.SLOTS_KEY] = "deck-clash", 2
    plain = first_doc("visual.yaml")
    plain["name"] = "deck-clash-r01"
    del plain[deployspec.SLOTS_KEY]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(slotted))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(plain))
    result = apply(emu, tmp_path / "a.yaml", tmp_path / "b.yaml")
    assert result.returncode == 2 and "deck-clash-r01 is defined twice" in result.stderr
    assert not [n for n in emu.snapshot()["deployments"] if n.startswith("deck-clash")]
    # A plain deployment of the same name (before the switch to slots) is pointed out.
    del slotted[deployspec.SLOTS_KEY]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(slotted))
    assert apply(emu, tmp_path / "plain.yaml").returncode == 0
    slotted[deployspec.SLOTS_KEY] = 2
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(slotted))
    moved = apply(emu, tmp_path / "a.yaml")
    assert moved.returncode == 0, moved.stderr
    assert "deck-clash-r01: create" in moved.stdout
    assert "deck-clash also exists as one plain deployment" in moved.stderr
    # And the other way round: a spec without slots applied beside existing slots.
    del slotted[deployspec.SLOTS_KEY]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(slotted))
    back = apply(emu, tmp_path / "plain.yaml")
    assert back.returncode == 0, back.stderr
    assert "deck-clash also exists as 2 slot deployment(s) (deck-clash-r00 …)" in back.stderr
