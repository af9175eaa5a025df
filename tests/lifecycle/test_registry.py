"""fastpatch.Registry: versions, tenants, hot swap under concurrent requests, rollback, audit, telemetry."""
import json
import threading
import time

import pytest
import torch

import fastpatch
from fastpatch import reference
from fastpatch.lifecycle.registry import Registry, content_hash, parse_version, read_audit

from models import tiny_model

D = 64
SITES = ("layers.0.resid_post", "layers.1.resid_mid")
PROMPT = torch.tensor([[5, 17, 33, 2, 90, 41], [8, 8, 12, 77, 3, 19], [100, 4, 55, 6, 7, 21]])
TENANTS = ["acme", "globex", "nobody"]  # nobody has no patch enabled
NEW = 4


def _vec(seed, norm=6.0):
    v = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def _version(seed):
    """Patches "a" and "b", each steering both sites with vectors unique to this version."""
    return {name: {site: fastpatch.Steer(_vec(seed * 10 + 2 * k + j)) for j, site in enumerate(SITES)}
            for k, name in enumerate(("a", "b"))}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _fingerprint(model):
    """Greedy decode logits of every step: they depend on the exact patch of every site and step."""
    with torch.no_grad():
        out = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    return torch.stack(out.logits)  # [steps, B, V]


def _registry(tmp_path, versions=(1, 2, 3)):
    reg = Registry(str(tmp_path / "audit.jsonl"), actor="tester")
    for i in versions:
        reg.publish("tone", f"1.{i}.0", _version(i))
    reg.enable("acme", "a")
    reg.enable("globex", "b")
    return reg


def test_semver_and_hash():
    assert parse_version("1.10.0") > parse_version("1.9.3")
    assert parse_version("2.0.0-rc.1") < parse_version("2.0.0")
    assert parse_version("2.0.0-rc.2") > parse_version("2.0.0-rc.1")
    assert parse_version("2.0.0-alpha") < parse_version("2.0.0-beta")
    for bad in ("1.0", "v1.0.0", "01.0.0", "1.0.0-", None):
        with pytest.raises(ValueError, match="semantic version"):
            parse_version(bad)
    assert content_hash(_version(1)) == content_hash(_version(1))
    assert content_hash(_version(1)) != content_hash(_version(2))


def test_publish_rules(tmp_path):
    reg = _registry(tmp_path, versions=(1,))
    with pytest.raises(ValueError, match="immutable"):
        reg.publish("tone", "1.1.0", _version(1))
    with pytest.raises(ValueError, match="not newer"):
        reg.publish("tone", "1.0.5", _version(1))
    with pytest.raises(ValueError, match="site: patch"):
        reg.publish("tone", "9.0.0", {"a": fastpatch.Steer(_vec(0))})
    with pytest.raises(KeyError, match="no published patch"):
        reg.enable("x", "zzz")
    assert reg.get("tone").version == "1.1.0" and reg.slots == {"a": 0, "b": 1}
    assert reg.ids(["globex", "nobody", "acme"]).tolist() == [1, -1, 0]


def test_serving_matches_direct_patching_and_rollback(model, tmp_path):
    reg = _registry(tmp_path)
    # Expected: the same patches applied by hand, per tenant row.
    want = {}
    for i in (1, 2):
        v = _version(i)
        with fastpatch.patched(model, {s: [v["a"][s], v["b"][s]] for s in SITES}) as h:
            h.select(torch.tensor([0, 1, -1]))
            want[i] = _fingerprint(model)
    plain = _fingerprint(model)
    reg.attach(model, "tone", "1.1.0")
    try:
        with reg.request(TENANTS) as served:
            got = _fingerprint(model)
        assert served.version.version == "1.1.0"
        torch.testing.assert_close(got, want[1], atol=1e-4, rtol=1e-4)
        reg.activate("tone", "1.2.0")
        with reg.request(TENANTS):
            torch.testing.assert_close(_fingerprint(model), want[2], atol=1e-4, rtol=1e-4)
        assert reg.rollback().version == "1.1.0"
        with reg.request(TENANTS) as served:
            torch.testing.assert_close(_fingerprint(model), want[1], atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="nothing to roll back"):
            reg.rollback()
        reg.disable("acme")
        with reg.request(["acme"]) as served:
            assert served.ids.tolist() == [-1]
    finally:
        reg.detach()
    torch.testing.assert_close(_fingerprint(model), plain)
    log = read_audit(str(tmp_path / "audit.jsonl"))
    assert [e["action"] for e in log] == ["publish"] * 3 + ["enable"] * 2 + ["attach", "activate", "rollback",
                                                                              "disable", "detach"]
    assert log == reg.audit
    assert all(e["actor"] == "tester" and "ts" in e for e in log)
    assert log[6]["previous"] == "tone@1.1.0" and log[6]["content_hash"] == reg.get("tone", "1.2.0").content_hash


def test_audit_log_is_append_only(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text(json.dumps({"action": "earlier"}) + "\n")
    reg = Registry(str(path), actor="x")
    reg.publish("s", "0.1.0", _version(1))
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"action": "earlier"} and json.loads(lines[1])["action"] == "publish"


def test_request_keeps_its_version_while_another_thread_swaps(model, tmp_path):
    reg = _registry(tmp_path)
    reg.attach(model, "tone", "1.1.0")
    try:
        ids = PROMPT[:1]
        with torch.no_grad():
            with reg.request(["acme"]) as served:
                first = model(input_ids=ids).logits
                t = threading.Thread(target=reg.activate, args=("tone", "1.2.0"))
                t.start()
                t.join()
                assert reg.active.version == "1.2.0"
                second = model(input_ids=ids).logits  # still pinned to 1.1.0
            with reg.request(["acme"]):
                third = model(input_ids=ids).logits
        assert served.version.version == "1.1.0"
        torch.testing.assert_close(first, second)
        assert (first - third).abs().max() > 1e-2
    finally:
        reg.detach()


def test_concurrent_requests_and_swaps_never_mix_versions(model, tmp_path):
    """Workers generate while a swapper flips versions; each result must equal its version's own
    fingerprint exactly. Any mix (sites from two versions in one forward, or steps of one request on
    different versions) gives logits that match no version: checked below to be distinguishable."""
    reg = _registry(tmp_path)
    reg.attach(model, "tone", "1.1.0")
    try:
        want = {}
        for i in (1, 2, 3):
            reg.activate("tone", f"1.{i}.0")
            with reg.request(TENANTS):
                want[f"1.{i}.0"] = _fingerprint(model)
        # Detectability: a forward mixing versions (site 0 from one, site 1 from another) differs.
        handle = reg.handle
        v1, v2 = reg.get("tone", "1.1.0"), reg.get("tone", "1.2.0")
        mixed = {SITES[0]: handle.patches[SITES[0]]}
        reg.activate("tone", "1.2.0")
        mixed[SITES[1]] = handle.patches[SITES[1]]
        handle.swap(mixed)
        with reg.request(TENANTS):
            torn = _fingerprint(model)
        reg.activate("tone", "1.1.0")
        for a in want.values():
            assert (torn - a).abs().max() > 1e-2
        for a in want:
            for b in want:
                assert a == b or (want[a] - want[b]).abs().max() > 1e-2
        assert v1.label != v2.label

        results, errors = [], []
        stop = threading.Event()
        in_flight_swaps = [0]

        def worker():
            try:
                for _ in range(12):
                    with reg.request(TENANTS) as served:
                        before = reg.active
                        fp = _fingerprint(model)
                        if reg.active is not before:
                            in_flight_swaps[0] += 1
                    results.append((served.version.version, fp))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def swapper():
            k = 0
            while not stop.is_set():
                reg.activate("tone", f"1.{k % 3 + 1}.0")
                k += 1
                time.sleep(0.0005)

        workers = [threading.Thread(target=worker) for _ in range(3)]
        sw = threading.Thread(target=swapper)
        sw.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        sw.join()
        assert not errors, errors
        assert len(results) == 36  # no request lost
        for version, fp in results:
            torch.testing.assert_close(fp, want[version], atol=1e-4, rtol=1e-4)
        assert in_flight_swaps[0] > 0, "no swap landed while a request was in flight: test proved nothing"
        assert len({v for v, _ in results}) >= 2
    finally:
        reg.detach()


def test_telemetry_equals_reference_fire_counts(model, tmp_path):
    site = "layers.1.resid_mid"
    ids = PROMPT
    with torch.no_grad(), fastpatch.hooks.record(model, [site]) as acts:
        model(input_ids=ids)
    h = acts[site].reshape(-1, D).double()
    cond = [_vec(50), _vec(51)]
    cos = [(h @ c.double()) / (h.norm(dim=-1) * c.norm()) for c in cond]
    thr = [float(c.median()) - 1e-4 for c in cos]  # about half the rows fire
    for c, t in zip(cos, thr):  # no row so close to the threshold that fp32 vs fp64 could disagree
        assert float((c - t).abs().min()) > 1e-6
    patches = {n: {site: fastpatch.Gated(fastpatch.Steer(_vec(60 + k)), cond[k], thr[k])}
               for k, n in enumerate(("a", "b"))}
    reg = Registry(None, actor="t")
    reg.publish("gated", "1.0.0", patches)
    reg.enable("acme", "a")
    reg.enable("globex", "b")
    reg.attach(model, "gated")
    try:
        with torch.no_grad():
            for _ in range(2):
                with reg.request(TENANTS):
                    model(input_ids=ids)
        bank = reg.handle.patches[site]
        want = torch.zeros(bank.num_patches, dtype=torch.int64)
        row_ids = reg.ids(TENANTS).repeat_interleave(ids.shape[1])
        for _ in range(2):
            reference.patch_rows(h, bank, row_ids, fire_counts=want)
        tel = reg.telemetry()["gated@1.0.0"]
        assert tel == {"a": {site: int(want[0])}, "b": {site: int(want[1])}}
        assert 0 < want[0] < ids.shape[1] * 2  # the gate really selects some rows, not all
        reg.reset_telemetry()
        assert reg.telemetry()["gated@1.0.0"] == {"a": {site: 0}, "b": {site: 0}}
    finally:
        reg.detach()
