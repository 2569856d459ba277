"""Replica slots: a DataCrunch deployment realised as one deployment per replica, over real HTTP.

DataCrunch picks which replica a lowered count stops; with ``_replica_slots`` the provider stops
exactly the idle replica the controller names.  The emulator runs here with ``stop_order=newest``:
a plain deployment lowered from two replicas to one would stop the newer, so the test names the
older one idle: only a provider that stops the replica it is told to passes.  Replicas are real
processes (the stand-in command that exits on SIGTERM).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from provider_kit import STANDIN, no_processes, replica_env, until

from gpuscale.controller import deployspec
from gpuscale.controller.pools import PoolRules, PoolsConfig, load_pools
from gpuscale.controller.providers.base import ProviderState, Replica
from gpuscale.controller.providers.datacrunch import DataCrunchClient, DataCrunchProvider, RetryPolicy
from gpuscale.controller.reconcile import Reconciler
from gpuscale.dev.emulator import Emulator, EmulatorConfig

_names = itertools.count()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(
        EmulatorConfig(cold_start_s=0.1, grace_s=2.0, tick_s=0.02, stop_order="newest")
    ) as emulator:
        yield emulator


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[DataCrunchClient]:
    emu.clear_faults()
    c = DataCrunchClient(
        emu.base_url,
        emu.client_id,
        emu.client_secret,
        timeout_s=5.0,
        retry=RetryPolicy(attempts=4, initial_s=0.01, max_s=0.05, jitter_s=0.0),
    )
    yield c
    emu.clear_faults()
    # Every deployment this test made goes, and with it every replica process.
    ids = set()
    for dep in await c.list_deployments():
        ids |= {r["id"] for r in await c.get_replicas(dep["name"])}
        await c.delete_deployment(dep["name"])
    await no_processes(ids)
    await c.aclose()


def spec(name: str, slots: int | None, *, spot: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "containers": [
            {
                "image": "registry.example.com/gpuscale/text:0.1.0",
                "exposed_port": 8001,
                "entrypoint_overrides": {"enabled": True, "cmd": list(STANDIN)},
                "env": [{"name": "GPUSCALE_POOL", "value_or_reference_to_secret": "text", "type": "plain"}],
            }
        ],
        "compute": {"name": "A100", "size": 1},
        "is_spot": spot,
        "scaling": deployspec.normalize_scaling({"min_replica_count": 0, "max_replica_count": 6}),
    }
    if slots is not None:
        out[deployspec.SLOTS_KEY] = slots
    return out


async def create(client: DataCrunchClient, slots: int | None, *, spot: bool = False) -> str:
    name = f"slotted-{next(_names)}"
    for body in deployspec.expand(spec(name, slots, spot=spot)):
        await client.create_deployment(body)
    return name


def pins(emu: Emulator, name: str) -> list[tuple[int, int]]:
    deps = emu.snapshot()["deployments"]
    out = []
    for i in itertools.count():
        slot = deps.get(deployspec.slot_name(name, i))
        if slot is None:
            return out
        out.append((slot["scaling"]["min_replica_count"], slot["scaling"]["max_replica_count"]))
    raise AssertionError("unreachable")


async def running(provider: DataCrunchProvider, name: str, count: int) -> ProviderState:
    async def check() -> ProviderState | None:
        st = await provider.observe(name)
        live = [r for r in st.replicas if r.status != "stopping"]
        ok = len(live) == count == len(st.replicas) and all(r.status == "running" for r in live)
        return st if ok else None

    return await until(check, f"{count} running replicas of {name}")


async def test_slots_act_as_one_deployment_and_stop_exactly_the_idle_replica(
    emu: Emulator, client: DataCrunchClient, caplog: pytest.LogCaptureFixture
) -> None:
    name = await create(client, 3)
    provider = DataCrunchProvider(client, list_ttl_s=0.0)
    fresh = await provider.observe(name)
    # Created at 0/1: nothing runs, and the controller must pin them.
    assert (fresh.target, fresh.replicas, fresh.pinned, fresh.stops_named) == (0, [], False, True)
    assert pins(emu, name) == [(0, 1)] * 3

    await provider.set_replicas(name, 1)
    (older,) = (await running(provider, name, 1)).replicas
    await provider.set_replicas(name, 2)
    both = await running(provider, name, 2)
    assert (both.target, both.pinned, both.status) == (2, True, "healthy")
    assert pins(emu, name) == [(1, 1), (1, 1), (0, 0)]
    newer = next(r for r in both.replicas if r.id != older.id)
    assert older.id.startswith(deployspec.slot_name(name, 0))  # the real replica ids, per slot
    assert newer.id.startswith(deployspec.slot_name(name, 1))

    # The older one is idle: the cloud (stop_order newest) would stop the newer one.
    await provider.set_replicas(name, 1, idle=[older.id])
    await no_processes({older.id})
    assert replica_env(newer.id), "the busy replica must keep running"
    left = await running(provider, name, 1)
    assert [r.id for r in left.replicas] == [newer.id] and left.target == 1
    assert pins(emu, name) == [(0, 0), (1, 1), (0, 0)]
    writes = emu.snapshot()["writes"]
    await provider.set_replicas(name, 1, idle=[older.id])  # idempotent: nothing written
    assert emu.snapshot()["writes"] == writes

    # Up again: the free slots, lowest index first, but not the slot just stopped (a replacement
    # stops a stuck replica and asks for one more at once: the stuck one must not stay); more
    # than there are: all, and one warning.
    await provider.set_replicas(name, 2)
    assert pins(emu, name) == [(0, 0), (1, 1), (1, 1)]
    with caplog.at_level(logging.WARNING, logger="gpuscale.controller.providers.datacrunch"):
        await provider.set_replicas(name, 5)
        await provider.set_replicas(name, 5)
    assert pins(emu, name) == [(1, 1)] * 3
    assert sum("3 replica slot(s) and 5 replicas" in r.getMessage() for r in caplog.records) == 1
    await running(provider, name, 3)

    # With no idle replica named: the newest goes first.
    await provider.set_replicas(name, 2)
    assert pins(emu, name)[0] == (0, 0)
    await provider.set_replicas(name, 0)
    assert pins(emu, name) == [(0, 0)] * 3
    gone = await running(provider, name, 0)
    assert (gone.target, gone.paused, gone.pinned) == (0, False, True)


async def test_a_new_provider_finds_the_slots_and_a_plain_deployment_is_as_before(
    emu: Emulator, client: DataCrunchClient
) -> None:
    slotted, plain = await create(client, 2), await create(client, None)
    await DataCrunchProvider(client).set_replicas(slotted, 1)
    await DataCrunchProvider(client).set_replicas(plain, 1)
    # Another process (a new leader) knows nothing of them: it reads them from the API.
    other = DataCrunchProvider(client)
    st = await running(other, slotted, 1)
    assert (st.target, st.stops_named) == (1, True)
    plain_state = await running(other, plain, 1)
    assert (plain_state.target, plain_state.stops_named) == (1, False)
    assert deployspec.slot_name(plain, 0) not in emu.snapshot()["deployments"]
    prices = await other.deployment_prices([slotted, plain])
    assert prices[slotted] == prices[plain] > 0  # a slot's price: the same spec, the same GPU
    await other.pause(slotted)
    paused = await other.observe(slotted)
    assert paused.paused and paused.status == "paused" and paused.target == 0
    await other.resume(slotted)
    assert (await running(other, slotted, 1)).target == 1


async def test_a_slot_pinned_to_more_than_one_by_hand_is_put_back(
    emu: Emulator, client: DataCrunchClient
) -> None:
    name = await create(client, 2)
    provider = DataCrunchProvider(client, list_ttl_s=0.0)
    await provider.set_replicas(name, 1)
    first = deployspec.slot_name(name, 0)
    scaling = await client.get_scaling(first)
    await client.patch_scaling(first, {**scaling, "min_replica_count": 2, "max_replica_count": 2})
    st = await provider.observe(name)
    assert not st.pinned  # min == max, but two replicas where the slot holds one
    await provider.set_replicas(name, 1)
    assert pins(emu, name) == [(1, 1), (0, 0)]


async def test_quota_in_one_slot_shows_in_the_status(emu: Emulator, client: DataCrunchClient) -> None:
    name = await create(client, 3)
    emu.set_faults(quota=deployspec.slot_name(name, 1))  # that slot's GPU type is sold out
    provider = DataCrunchProvider(client, list_ttl_s=0.0)
    await provider.set_replicas(name, 2)

    async def quota() -> ProviderState | None:
        st = await provider.observe(name)
        return st if st.status == "quota_reached" else None

    st = await until(quota, "quota_reached in the merged status")
    assert st.target == 2


async def test_a_preempted_replica_shows_as_gone(emu: Emulator, client: DataCrunchClient) -> None:
    name = await create(client, 2, spot=True)
    provider = DataCrunchProvider(client, list_ttl_s=0.0)
    await provider.set_replicas(name, 2)
    before = {r.id for r in (await running(provider, name, 2)).replicas}
    emu.set_faults("preempt=next:1")

    async def vanished() -> set[str] | None:
        ids = {r.id for r in (await provider.observe(name)).replicas}
        return before - ids or None

    (lost,) = await until(vanished, "a preempted replica gone from the merged list")
    assert lost in emu.snapshot()["preempted"]


async def test_observe_calls_stay_near_one_list_and_two_per_slot_replica(
    emu: Emulator, client: DataCrunchClient
) -> None:
    names = [await create(client, 5) for _ in range(2)]
    provider = DataCrunchProvider(client, list_ttl_s=0.0)  # shared only by calls side by side
    for n in names:
        await provider.set_replicas(n, 1)
        await running(provider, n, 1)
    before = emu.snapshot()["requests"]
    await asyncio.gather(*(provider.observe(n) for n in names))
    # One shared list, then replicas + status of the one pinned slot of each.
    assert emu.snapshot()["requests"] - before == 1 + 2 * 2


class _Plain:
    """A provider whose deployments cannot stop named replicas (as a plain DataCrunch one)."""

    name = "fake"

    async def observe(self, deployment: str) -> ProviderState:
        return ProviderState(replicas=[Replica("r1", "running", 0.0)], target=1, stops_named=False)


def _shipped(victims: str) -> tuple[PoolsConfig, PoolRules]:
    config = load_pools(ROOT / "deploy" / "datacrunch" / "pools.yaml")
    rules = config.pools["text"].model_copy(update={"scale_down_victims": victims})
    return config.model_copy(update={"pools": {**config.pools, "text": rules}}), rules


async def test_reconcile_warns_once_when_idle_victims_meet_a_provider_that_picks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, rules = _shipped("idle")
    reconciler = Reconciler(config, None, None, _Plain(), controller_id="t")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="gpuscale.controller"):
        for _ in range(3):
            merged, _per, _err = await reconciler._observe_provider(rules)
    assert merged is not None and not merged.stops_named
    warned = [r.getMessage() for r in caplog.records if "scale_down_victims: idle" in r.getMessage()]
    # One per deployment of the pool, not one per tick.
    assert len(warned) == len(rules.options) and all("_replica_slots" in w for w in warned)
    assert [o.name for o in rules.options] == [w.split("deployment ")[1].split()[0] for w in warned]
    config, rules = _shipped("any")
    caplog.clear()
    await Reconciler(config, None, None, _Plain(), controller_id="t")._observe_provider(rules)  # type: ignore[arg-type]
    assert not [r for r in caplog.records if "scale_down_victims" in r.getMessage()]
