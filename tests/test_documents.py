"""The document store: content-named atomic copies under the root, names that cannot escape it, and
emulator replicas that read a deck through their shared mount after it was submitted elsewhere."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from pdfs import make_deck
from provider_kit import no_processes, until

from gpuscale.controller.providers.datacrunch import DataCrunchClient, DataCrunchProvider
from gpuscale.dev.emulator import Emulator, EmulatorConfig
from gpuscale.dev.standin import OllamaStandin
from gpuscale.queue.documents import DocumentRefused, DocumentStore

GPUSCALE = str(Path(sys.executable).with_name("gpuscale"))


def test_put_is_content_named_and_deduplicated(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "root")
    a = tmp_path / "a.pdf"
    a.write_bytes(b"%PDF-1.7 first")
    name = store.put_file(a)
    assert name == f"{hashlib.sha256(b'%PDF-1.7 first').hexdigest()}.pdf"
    assert store.resolve(name).read_bytes() == b"%PDF-1.7 first"
    assert store.put_chunks([b"%PDF-1.7 ", b"first"]) == name
    assert store.put_chunks([b"%PDF-1.7 second"]) != name
    assert len(os.listdir(store.root)) == 2  # no temporary files left behind


def test_oversized_upload_leaves_nothing(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "root")
    with pytest.raises(DocumentRefused, match="over the 10-byte limit"):
        store.put_chunks([b"%PDF-1.7", b"0123456789"], max_bytes=10)
    assert os.listdir(store.root) == []


def test_resolve_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.pdf").write_bytes(b"%PDF-")
    (root / "link.pdf").symlink_to(tmp_path / "outside.pdf")
    store = DocumentStore(root)
    too_long = ("\u1e70\u033a" * 100, "a" * 300, "x/" * 3000)  # the name's fault (ENAMETOOLONG)
    for name in (
        "/etc/passwd",
        "../outside.pdf",
        "a/../../outside.pdf",
        "link.pdf",
        "",
        "a\0b",
        "a\udb46.pdf",
        *too_long,
    ):
        with pytest.raises(DocumentRefused):
            store.resolve(name)
    assert store.resolve("sub/x.pdf") == root.resolve() / "sub" / "x.pdf"


async def test_replicas_read_a_deck_submitted_elsewhere_through_their_shared_mount(
    db: asyncpg.Pool, dsn: str, db_env: dict[str, str], tmp_path: Path
) -> None:
    """The deployment mounts a shared volume at /mnt/shared and reads decks from
    /mnt/shared/uploads; the emulator maps that volume to a local folder.  The deck is submitted
    from a folder of its own, with the submitter's own mount of the same volume as its root."""
    shared = tmp_path / "shared"
    submitter = tmp_path / "laptop"
    submitter.mkdir()
    make_deck(submitter / "acme.pdf", pages=3)
    env = {
        **db_env,
        "GPUSCALE_DOCUMENT_ROOT": str(shared / "vol-decks" / "uploads"),
        "GPUSCALE_DECK_BATCH_PAGES": "2",
    }
    r = subprocess.run(
        [GPUSCALE, "submit-deck", "acme.pdf"], cwd=submitter, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    (submitter / "acme.pdf").unlink()  # only the stored copy is left to read
    payloads = await db.fetch("SELECT payload FROM processing_queue WHERE task_type = 'visual_analysis'")
    assert len(payloads) == 2 and all('"/' not in str(p["payload"]) for p in payloads)  # relative

    with (
        OllamaStandin(models=["gemma3:12b"], latency_s=0.01, load_latency_s=0.05) as standin,
        Emulator(EmulatorConfig(cold_start_s=0.1, grace_s=5.0, tick_s=0.05, shared_dir=shared)) as emu,
    ):
        client = DataCrunchClient(emu.base_url, emu.client_id, emu.client_secret, timeout_s=5.0)

        def plain(name: str, value: str) -> dict[str, str]:
            return {"name": name, "value_or_reference_to_secret": value, "type": "plain"}

        await client.create_deployment(
            {
                "name": "deck-visual",
                "containers": [
                    {
                        "image": "registry.example.com/gpuscale/visual:0.1.0",
                        "exposed_port": 8001,
                        "env": [
                            plain("GPUSCALE_POOL", "visual"),
                            plain("GPUSCALE_DATABASE_URL", dsn),
                            plain("OLLAMA_HOST", standin.url),
                            plain("GPUSCALE_PDF_DPI", "40"),
                            plain("GPUSCALE_POLL_INTERVAL_S", "0.5"),
                            plain("GPUSCALE_DOCUMENT_ROOT", "/mnt/shared/uploads"),
                        ],
                        "volume_mounts": [
                            {"type": "shared", "mount_path": "/mnt/shared", "volume_id": "vol-decks"}
                        ],
                    }
                ],
                "compute": {"name": "H100", "size": 1},
            }
        )
        try:
            await DataCrunchProvider(client).set_replicas("deck-visual", 1)

            async def visual_done() -> bool:
                rows = await db.fetch(
                    "SELECT status::text, error FROM processing_queue WHERE task_type = 'visual_analysis'"
                )
                assert all(r["status"] not in ("failed", "dead") for r in rows), [dict(r) for r in rows]
                return all(r["status"] == "done" for r in rows)

            await until(visual_done, "both page batches done by the replica", timeout_s=90)
            pages = await db.fetchval(
                """SELECT sum(jsonb_array_length(result->'pages')) FROM processing_queue
                    WHERE task_type = 'visual_analysis'"""
            )
            assert pages == 3
        finally:
            ids = {r["id"] for r in await client.get_replicas("deck-visual")}
            await client.delete_deployment("deck-visual")
            await client.aclose()
            await no_processes(ids)


async def test_prune_deletes_only_unreferenced_old_documents(
    db: asyncpg.Pool, db_env: dict[str, str], tmp_path: Path
) -> None:
    """`gpuscale documents prune` keeps what a task names (any status) and what is young; deletes
    the rest and abandoned half-written uploads; leaves files it did not write alone."""
    root = tmp_path / "documents"
    store = DocumentStore(root)
    env = {**db_env, "GPUSCALE_DOCUMENT_ROOT": str(root)}
    make_deck(tmp_path / "named.pdf", pages=2)
    r = subprocess.run([GPUSCALE, "submit-deck", str(tmp_path / "named.pdf")], env=env, capture_output=True)
    assert r.returncode == 0, r.stderr
    named = (await db.fetchval("SELECT payload->>'document' FROM processing_queue LIMIT 1")) or ""
    await db.execute("UPDATE processing_queue SET status = 'dead'")  # kept whatever the status
    orphan_old = store.put_chunks([b"%PDF-1.7 old"])
    orphan_young = store.put_chunks([b"%PDF-1.7 young"])
    (root / ".incoming-abandoned").write_bytes(b"%PDF-half")
    (root / "notes.txt").write_text("the operator's own file")
    day = 86400

    def age(name: str) -> None:  # ten days old
        when = (root / name).stat().st_mtime - 10 * day
        os.utime(root / name, (when, when))

    for name in (named, orphan_old, ".incoming-abandoned", "notes.txt"):
        age(name)

    def prune(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [GPUSCALE, "documents", "prune", "--older-than-days", "7", "--json", *args],
            env=env,
            capture_output=True,
            text=True,
        )

    dry = prune("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(json.loads(dry.stdout)["deleted"]) == sorted([orphan_old, ".incoming-abandoned"])
    assert (root / orphan_old).exists()  # a dry run deletes nothing
    done = prune()
    assert json.loads(done.stdout)["deleted"] == json.loads(dry.stdout)["deleted"]
    assert sorted(os.listdir(root)) == sorted([named, orphan_young, "notes.txt"])

    # A resubmission makes an old copy young again: it is not pruned under the submitter.
    old = store.put_chunks([b"%PDF-1.7 again"])
    age(old)
    assert store.put_chunks([b"%PDF-1.7 again"]) == old
    assert old not in store.prune(set(), older_than_s=7 * day).deleted

    bad = subprocess.run(
        [GPUSCALE, "documents", "prune"],
        env={**db_env, "GPUSCALE_DOCUMENT_ROOT": str(tmp_path / "missing")},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
