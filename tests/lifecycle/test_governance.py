"""Governance of patches: sticky rollout statistics, A/B arms, promote/abort/rollback, expiry at the boundary,
policy scope and edit bounds, hostile input, per-request serving against an independent hook oracle (also under
concurrent swaps), telemetry against kernel fire counts, alerts and the guard, replicas picking up changes."""
from __future__ import annotations

import math
import random
import threading

import pytest
import torch

import fastpatch
from fastpatch.files import patch_file
from fastpatch.lifecycle import rollout as ro
from fastpatch.lifecycle.governance import Governance
from fastpatch.lifecycle.policy import PolicyViolation
from fastpatch.lifecycle.serving import Serving
from fastpatch.lifecycle.store import SQLiteStore

from governance_util import D, NEW, PROMPT, SITE0, Clock, greedy_logits, hook_oracle, patches_of, vec
from models import tiny_model

@pytest.fixture
def gov(tmp_path):
    g = Governance(SQLiteStore(tmp_path / "store"), actor="tester", clock=Clock())
    yield g
    g.store.close()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


# -- rollout ------------------------------------------------------------------------------------------
KEYS = [f"user-{i}" for i in range(10_000)]


def _split(state, name="tone"):
    out = {}
    for k in KEYS:
        out[k] = ro.assign(state, name, k)
    return out


def test_canary_split_within_2_percent_and_sticky_as_it_grows():
    state = ro.activate(ro.empty(), "1.0.0")
    previous_in = set()
    for pct in (1, 5, 10, 25, 50, 100):
        state = ro.canary(state, "1.1.0", pct)
        got = _split(state)
        inside = {k for k, (arm, v) in got.items() if arm == "canary"}
        assert all(got[k] == ("canary", "1.1.0") for k in inside)
        assert all(got[k] == ("control", "1.0.0") for k in set(KEYS) - inside)
        assert abs(100 * len(inside) / len(KEYS) - pct) <= 2.0, (pct, len(inside))
        assert previous_in <= inside  # nobody already in leaves when the percentage grows
        previous_in = inside
    assert len(previous_in) == len(KEYS)


def test_ab_arms_split_and_keys_keep_their_arm():
    state = ro.activate(ro.empty(), "1.0.0")
    state = ro.experiment(state, {"b": ("1.1.0", 20), "c": ("1.2.0", 30)})
    first = _split(state)
    counts = {a: sum(1 for x in first.values() if x[0] == a) for a in ("control", "b", "c")}
    for arm, target in (("b", 20), ("c", 30), ("control", 50)):
        assert abs(100 * counts[arm] / len(KEYS) - target) <= 2.0, counts
    # Grow b: b's keys stay in b, c is untouched, only control keys move (into b).
    state = ro.experiment(state, {"b": ("1.1.0", 45), "c": ("1.2.0", 30)})
    second = _split(state)
    for k in KEYS:
        if first[k][0] in ("b", "c"):
            assert second[k] == first[k]
        else:
            assert second[k][0] in ("control", "b")
    assert abs(100 * sum(1 for x in second.values() if x[0] == "b") / len(KEYS) - 45) <= 2.0
    with pytest.raises(ValueError, match="lane"):
        ro.experiment(state, {"b": ("1.1.0", 60), "c": ("1.2.0", 30)})
    # Other sets hash independently (a key's bucket depends on the set's name).
    other = sum(1 for k in KEYS if ro.assign(state, "other", k)[0] == first[k][0])
    assert other < 0.8 * len(KEYS)


def test_keyless_requests_are_random_but_split_right():
    state = ro.canary(ro.activate(ro.empty(), "1.0.0"), "1.1.0", 10)
    rng = random.Random(0)
    n = sum(1 for _ in range(10_000) if ro.assign(state, "tone", None, rng)[0] == "canary")
    assert abs(n / 100 - 10) <= 2.0


def test_promote_abort_pause_rollback(gov):
    for i in (0, 1, 2):
        gov.publish("tone", f"1.{i}.0", patches_of(i))
    gov.activate("tone", "1.0.0")
    gov.canary("tone", "1.1.0", 10)
    key = next(k for k in KEYS if gov.resolve("tone", key=k).arm == "canary")
    assert gov.resolve("tone", key=key).version == "1.1.0"
    gov.pause("tone")
    assert gov.resolve("tone", key=key).version == "1.0.0"
    gov.resume("tone")
    assert gov.resolve("tone", key=key).version == "1.1.0"
    gov.abort("tone")
    assert gov.resolve("tone", key=key).version == "1.0.0"
    gov.canary("tone", "1.2.0", 50)
    gov.promote("tone")
    assert {gov.resolve("tone", key=k).version for k in KEYS[:50]} == {"1.2.0"}
    gov.rollback("tone")
    assert gov.resolve("tone", key=key).version == "1.0.0"
    with pytest.raises(ValueError, match="nothing to roll back"):
        gov.rollback("tone")
    with pytest.raises(ValueError, match="nothing to promote"):
        gov.promote("tone")
    actions = [e["action"] for e in gov.audit("tone")]
    assert actions == ["create_set", "publish", "publish", "publish", "activate", "rollout", "pause", "resume",
                       "abort", "rollout", "promote", "rollback"]
    assert {e["actor"] for e in gov.audit("tone")} == {"tester"}


# -- expiry -------------------------------------------------------------------------------------------
def test_expiry_exactly_at_the_boundary(gov, model):
    clock = gov.clock
    T = clock.t + 100.0
    gov.publish("tone", "1.0.0", patches_of(1))
    gov.publish("tone", "1.1.0", patches_of(2), expires_at=T)
    gov.activate("tone", "1.0.0")
    gov.canary("tone", "1.1.0", 100)
    serving = Serving(gov, model, poll_interval=0)
    clock.t = math.nextafter(T, 0)  # the last representable instant before the expiry: still served
    with serving.request("tone", key="k") as s:
        pass
    assert (s.version, s.choice.arm) == ("1.1.0", "canary")
    assert not [e for e in gov.audit("tone") if e["action"] == "expired"]
    clock.t = T  # exactly at the expiry: not served, the request gets the fallback (the stable version)
    with serving.request("tone", key="k") as s:
        assert ("tone", "1.1.0", "p") not in serving._slots  # dropped from the banks at the next refresh
    assert (s.version, s.choice.arm) == ("1.0.0", "fallback") and "expired" in s.choice.reason
    with serving.request("tone", key="k2"):
        pass
    expired = [e for e in gov.audit("tone") if e["action"] == "expired"]
    assert len(expired) == 1 and expired[0]["version"] == "1.1.0" and expired[0]["expires_at"] == T
    status = {v["version"]: v["status"] for v in gov.versions("tone")}
    assert status == {"1.0.0": "stable", "1.1.0": "expired"}
    with pytest.raises(ValueError, match="expired"):
        gov.activate("tone", "1.1.0")
    gov.expire("tone", "1.0.0")  # default: now; the stable version expires too -> no patch at all
    assert gov.resolve("tone", key="k").version is None
    serving.close()


# -- policy and hostile input -------------------------------------------------------------------------
def test_policy_refuses_publish_and_scopes_requests(gov, model):
    gov.create_set("tone", policy={"regions": ["eu"], "products": ["chat"], "sites": ["layers.0.*"],
                                   "max_edit_norm": 10.0, "max_edit_gain": 1.0})
    gen = gov.store.generation()
    with pytest.raises(PolicyViolation, match="site not allowed"):
        gov.publish("tone", "1.0.0", patches_of(1))  # touches layers.1
    with pytest.raises(PolicyViolation, match="edit norm 20 > max_edit_norm 10"):
        gov.publish("tone", "1.0.0", {"p": {SITE0: fastpatch.Steer(vec(1, norm=20.0))}})
    low = fastpatch.LowRank(torch.randn(D, 2) * 3, torch.randn(2, D) * 3)
    with pytest.raises(PolicyViolation, match="edit gain"):
        gov.publish("tone", "1.0.0", {"p": {SITE0: low}})
    assert gov.store.generation() == gen and gov.versions("tone") == []  # nothing stored
    assert not list(gov.store.blobs.glob("*/*"))  # not even a blob
    gov.publish("tone", "1.0.0", {"p": {SITE0: fastpatch.Ablate(vec(3))}})  # gain exactly 1: allowed
    gov.activate("tone", "1.0.0")
    assert gov.resolve("tone", labels={"region": "eu", "product": "chat"}).version == "1.0.0"
    out = gov.resolve("tone", labels={"region": "us", "product": "chat"})
    assert out.version is None and "region='us'" in out.reason
    assert gov.resolve("tone", labels={"product": "chat"}).version is None  # a missing label is out of scope
    with pytest.raises(ValueError, match="unknown label 'regoin'"):
        gov.resolve("tone", labels={"regoin": "eu"})
    with pytest.raises(ValueError, match="unknown policy field"):
        gov.set_policy("tone", {"countries": ["fr"]})
    # Out of scope on the serving path: the model runs exactly unpatched.
    serving = Serving(gov, model, poll_interval=0)
    with torch.no_grad():
        with serving.request("tone", labels={"region": "us", "product": "chat"}) as s:
            patched_out = model(PROMPT).logits
    serving.close()
    with torch.no_grad():
        plain = model(PROMPT).logits
    assert s.version is None and s.slot == -1
    # Unpatched up to the fused kernel's rounding (it sums the residual in another order than eager).
    torch.testing.assert_close(patched_out, plain, rtol=1e-5, atol=1e-5)


def _nan_file(tmp_path):
    good = patch_file.save({SITE0: fastpatch.Steer(vec(1))}, tmp_path / "good.safetensors", name="p")
    manifest, tensors = patch_file.read_manifest(good)
    from safetensors.torch import save as st_save

    tensors = {k: v.clone() for k, v in tensors.items()}
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = float("nan")
    manifest["payload_sha256"] = patch_file.payload_sha256(tensors)  # a consistent file, only the value is bad
    bad = tmp_path / "nan.safetensors"
    bad.write_bytes(st_save(tensors, metadata={patch_file.KEY_FORMAT: patch_file.FORMAT,
                                               patch_file.KEY_FORMAT_VERSION: str(patch_file.FORMAT_VERSION),
                                               patch_file.KEY_MANIFEST: __import__("json").dumps(manifest)}))
    return good, bad


def test_hostile_input_gives_clear_errors_and_loses_nothing(gov, tmp_path):
    gov.publish("tone", "1.0.0", patches_of(1))
    gov.activate("tone", "1.0.0")
    before = (gov.store.snapshot(), gov.audit())
    good, nan = _nan_file(tmp_path)
    cases = [
        (lambda: gov.publish("tone", "1.1", patches_of(2)), ValueError, "semantic version"),
        (lambda: gov.publish("tone", "v2.0.0", patches_of(2)), ValueError, "semantic version"),
        (lambda: gov.publish("tone", "1.0.0", patches_of(2)), Exception, "already published"),
        (lambda: gov.publish("../../etc", "2.0.0", patches_of(2)), ValueError, "no '/' or '..'"),
        (lambda: gov.publish("a/b", "2.0.0", patches_of(2)), ValueError, "no '/' or '..'"),
        (lambda: gov.publish("tone", "2.0.0", {"../x": patches_of(2)["p"]}), ValueError, "patch name"),
        (lambda: gov.publish("tone", "2.0.0", {"p": nan}), fastpatch.PatchFileError, "NaN or infinite"),
        (lambda: gov.publish("tone", "2.0.0", {"p": str(tmp_path / "missing.safetensors")}), ValueError,
         "cannot read"),
        (lambda: gov.publish("tone", "2.0.0", {"p": {"layers.0.resid_sideways": fastpatch.Steer(vec(2))}}),
         ValueError, "not a site name"),
        (lambda: gov.resolve("tone", labels={"tenant": "../../x"}), ValueError, "label tenant"),
        (lambda: gov.resolve("tone", labels={"colour": "red"}), ValueError, "unknown label"),
        (lambda: gov.canary("tone", "9.9.9", 10), KeyError, "no version"),
        (lambda: gov.canary("tone", "1.0.0", 150), ValueError, "between 0 and 100"),
        (lambda: gov.activate("nope", "1.0.0"), KeyError, "no patch set"),
    ]
    small = Governance(gov.store, actor="tester", clock=gov.clock, max_patch_bytes=100)
    cases.append((lambda: small.publish("tone", "2.0.0", {"p": good}), ValueError, "over the limit"))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:50])
    cases.append((lambda: gov.publish("tone", "2.0.0", {"p": truncated}), fastpatch.PatchFileError, "truncated"))
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    assert (gov.store.snapshot(), gov.audit()) == before  # nothing lost, nothing half-added
    assert gov.load("tone", "1.0.0")["p"][SITE0].v.tolist() == patches_of(1)["p"][SITE0].v.tolist()
    gov.publish("tone", "2.0.0", {"p": good})  # a good file after all that: accepted


# -- serving ------------------------------------------------------------------------------------------
def test_concurrent_requests_choose_per_request_and_never_mix_versions(gov, model):
    """Threads generate on 2 sets while another thread publishes, rolls out, promotes and rolls back; every
    step of every request equals the independent oracle of exactly the version it reports."""
    sets = {"tone": [1, 2, 3, 4], "style": [11, 12, 13, 14]}
    expected = {(n, None): greedy_logits(model) for n in sets}
    for n, seeds in sets.items():
        for i, s in enumerate(seeds):
            expected[(n, f"1.{i}.0")] = hook_oracle(model, patches_of(s)["p"])
        gov.publish(n, "1.0.0", patches_of(seeds[0]))
        gov.activate(n, "1.0.0")
    # Distinct versions are far apart (so a mixed step would show).
    labels = list(expected)
    gaps = [float((expected[a] - expected[b]).abs().max()) for i, a in enumerate(labels) for b in labels[i + 1:]
            if a[0] == b[0]]
    assert min(gaps) > 1e-2
    serving = Serving(gov, model, poll_interval=0)
    results, errors = [], []
    stop = threading.Event()
    # Each client's count of finished requests. After each change the admin thread waits until every
    # client has finished three more: at least two requests of each (one per set, as clients alternate
    # sets) began after the change. The served versions then follow from the schedule, not from how
    # busy the machine is.
    done = [0, 0, 0]
    progress = threading.Condition()

    def client(c):
        try:
            k = 0
            while not stop.is_set() or k < 3:
                name = ("tone", "style")[(c + k) % 2]
                with serving.request(name, key=f"user-{c}-{k}") as s:
                    got = greedy_logits(model)
                results.append((name, s.version, got))
                k += 1
                with progress:
                    done[c] += 1
                    progress.notify_all()
        except BaseException as exc:
            errors.append(exc)
            with progress:
                progress.notify_all()

    def settle():
        with progress:
            start = list(done)
            ok = progress.wait_for(lambda: errors or all(d >= s + 3 for d, s in zip(done, start)), timeout=300)
        assert ok, f"clients made no progress in 300 s: {done}"

    threads = [threading.Thread(target=client, args=(c,)) for c in range(3)]
    for t in threads:
        t.start()
    settle()  # every client has served 1.0.0 of both sets
    for n, seeds in sets.items():
        for i in (1, 2, 3):
            gov.publish(n, f"1.{i}.0", patches_of(seeds[i]))
        gov.canary(n, "1.1.0", 50)
        settle()
    for n in sets:
        gov.promote(n)
        settle()  # every key now gets 1.1.0
        gov.canary(n, "1.2.0", 30)
        settle()
        gov.abort(n)
        gov.experiment(n, {"x": ("1.2.0", 40), "y": ("1.3.0", 40)})
        settle()
        gov.rollback(n)
    stop.set()
    for t in threads:
        t.join()
    serving.close()
    assert not errors, errors
    served_versions = {(n, v) for n, v, _ in results}
    assert {("tone", "1.0.0"), ("style", "1.0.0"), ("tone", "1.1.0"), ("style", "1.1.0")} <= served_versions
    for name, version, got in results:
        torch.testing.assert_close(got, expected[(name, version)], rtol=1e-4, atol=1e-4)


def test_replica_picks_up_changes_without_restart(tmp_path, model):
    root = tmp_path / "shared"
    admin = Governance(SQLiteStore(root), actor="admin")
    replica = Governance(SQLiteStore(root), actor="replica")  # another connection, as another process would
    expected = hook_oracle(model, patches_of(2)["p"])  # before the model is patched
    admin.publish("tone", "1.0.0", patches_of(1))
    admin.activate("tone", "1.0.0")
    serving = Serving(replica, model, poll_interval=0)
    with serving.request("tone", key="u") as s:
        pass
    assert s.version == "1.0.0"
    admin.publish("tone", "1.1.0", patches_of(2))
    admin.activate("tone", "1.1.0")
    with serving.request("tone", key="u") as s:
        got = greedy_logits(model)
    assert s.version == "1.1.0" and s.generation == admin.store.generation()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    serving.close()


# -- telemetry, alerts, guard -------------------------------------------------------------------------
def test_fire_counts_rows_and_prometheus(gov, model):
    gov.publish("tone", "1.0.0", patches_of(1))
    gov.activate("tone", "1.0.0")
    serving = Serving(gov, model, poll_interval=0)
    for k in range(3):
        with serving.request("tone", key=f"u{k}") as s:
            greedy_logits(model)
            s.add_rows(PROMPT.shape[1] + NEW - 1)  # prompt rows + decode steps (the last token is never run)
    serving.flush()
    tel = {(r["version"], r["arm"], r["metric"]): r for r in gov.store.telemetry()}
    rows = 3 * (PROMPT.shape[1] + NEW - 1)
    assert tel[("1.0.0", "control", "requests")]["n"] == 3
    assert tel[("1.0.0", "control", "rows")]["total"] == rows
    # The kernel's own counters: an ungated patch fires on every row at both sites.
    assert tel[("1.0.0", "all", "fires")]["total"] == rows * 2
    text = __import__("fastpatch.lifecycle.telemetry", fromlist=["x"]).prometheus(
        gov.store.telemetry(), alerts=0, generation=gov.store.generation(), active=serving.active())
    assert f'fastpatch_fires_total{{set="tone",version="1.0.0",arm="all"}} {rows * 2}' in text
    assert 'fastpatch_requests_total{set="tone",version="1.0.0",arm="control"} 3' in text
    assert 'fastpatch_active_version{set="tone",version="1.0.0",arm="control"} 100' in text
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    serving.close()


def test_metric_alert_and_guard_pause_are_audited(gov, model):
    gov.publish("tone", "1.0.0", patches_of(1))
    gov.publish("tone", "1.1.0", patches_of(2))
    gov.activate("tone", "1.0.0")
    gov.canary("tone", "1.1.0", 50)
    gov.set_guard("tone", "pause", bands={"quality": [0.8, 1.0]})
    gov.detector.window = 5
    serving = Serving(gov, model, poll_interval=0)
    canary_keys = [k for k in KEYS[:200] if gov.resolve("tone", key=k).arm == "canary"][:10]
    control_keys = [k for k in KEYS[:200] if gov.resolve("tone", key=k).arm == "control"][:10]
    alerts = []
    for k in control_keys[:5]:  # control stays in its band
        with serving.request("tone", key=k) as s:
            pass
        alerts.append(serving.report(s, "quality", 0.9))
    assert alerts == [None] * 5
    for k in canary_keys[:5]:  # the canary regresses
        with serving.request("tone", key=k) as s:
            assert s.choice.arm == "canary"
        alerts.append(serving.report(s, "quality", 0.5))
    alert = alerts[-1]
    assert alert is not None and alert["arm"] == "canary" and alert["band"] == [0.8, 1.0]
    assert alert["window_mean"] == pytest.approx(0.5)
    state = gov.show("tone")["rollout"]
    assert state["paused"] and state["stable"] == "1.0.0"
    with serving.request("tone", key=canary_keys[0]) as s:
        pass
    assert s.version == "1.0.0"  # paused: the canary's keys get the stable version
    pause = [e for e in gov.audit("tone") if e["action"] == "pause"]
    assert len(pause) == 1 and pause[0]["actor"] == "guard" and "quality" in pause[0]["reason"]
    assert [a["metric"] for a in gov.alerts("tone")] == ["quality"]
    serving.close()


def test_learnt_band_from_first_window_and_fire_rate():
    from fastpatch.lifecycle.telemetry import Detector

    det = Detector(window=10, k=4.0)
    rng = random.Random(0)
    for _ in range(10):
        assert det.observe("t", "1.0.0", "control", "m", 1.0 + rng.gauss(0, 0.1)) is None  # learns the band
    for _ in range(30):  # same distribution: no alert
        assert det.observe("t", "1.0.0", "control", "m", 1.0 + rng.gauss(0, 0.1)) is None
    out = [det.observe("t", "1.0.0", "control", "m", 1.5 + rng.gauss(0, 0.1)) for _ in range(10)]
    assert out[-1] is not None and out[-1]["band_source"] == "first window"
    with pytest.raises(ValueError, match="finite"):
        det.observe("t", "1.0.0", "control", "m", float("nan"))


def test_published_file_keeps_the_model_fingerprint_it_records(gov, tmp_path):
    """A file fitted on a model records its fingerprint; the stored version keeps it, so a server loading the
    version can still refuse another model (it warned "records no model fingerprint" when publish dropped it)."""
    model = tiny_model("llama")
    path = fastpatch.save({SITE0: fastpatch.Steer(vec(3))}, tmp_path / "fitted.safetensors", model=model)
    recorded = patch_file.read_manifest(path)[0]["model"]
    gov.publish("tone", "1.0.0", {"p": str(path)})
    stored = tmp_path / "stored.safetensors"
    stored.write_bytes(gov.store.get_blob(gov.store.get_version("tone", "1.0.0")["blobs"]["p"]))
    assert recorded and patch_file.read_manifest(stored)[0]["model"] == recorded
    gov.publish("tone", "1.1.0", {"p": {SITE0: fastpatch.Steer(vec(4))}})  # in-memory patches: nothing to keep
    stored.write_bytes(gov.store.get_blob(gov.store.get_version("tone", "1.1.0")["blobs"]["p"]))
    assert patch_file.read_manifest(stored)[0].get("model") is None


def test_given_only_metrics_learn_no_band():
    """Latency follows the machine's load: a ``given_only`` metric never alerts against a band learnt from its
    first window (the vLLM bridge's latency), only against one an operator gives; other metrics still learn."""
    from fastpatch.lifecycle.telemetry import Detector

    det = Detector(window=4, given_only={"latency_s"})
    for load in (0.1, 5.0, 0.1, 9.0):  # windows of wildly different load: nothing learnt, nothing alerts
        assert all(det.observe("t", "1.0.0", "canary", "latency_s", load) is None for _ in range(4))
    assert det.band("t", "canary", "latency_s") is None
    for _ in range(4):
        det.observe("t", "1.0.0", "canary", "effect", 1.0)
    assert det.band("t", "canary", "effect")[2] == "first window"  # not given_only: learnt as before
    det.set_band("t", "latency_s", 0.0, 1.0)
    out = [det.observe("t", "1.0.0", "canary", "latency_s", 3.0) for _ in range(4)]
    assert out[-1] is not None and out[-1]["band"] == [0.0, 1.0] and out[-1]["band_source"] == "validation"


def test_fire_rate_leaving_its_band_alerts(gov, model):
    """The kernel-counted fire rate (fires / (rows x sites)) is checked at each flush: an ungated patch fires on
    every row (rate 1), outside a band of [0, 0.5] given for a patch expected to fire on at most half."""
    gov.publish("tone", "1.0.0", patches_of(1))
    gov.activate("tone", "1.0.0")
    gov.set_guard("tone", None, bands={"fire_rate": [0.0, 0.5]})
    gov.detector.window = 2
    serving = Serving(gov, model, poll_interval=0)
    alerts = []
    for _ in range(2):
        with serving.request("tone", key="u") as s:
            greedy_logits(model)
            s.add_rows(PROMPT.shape[1] + NEW - 1)
        alerts += serving.flush()
    serving.close()
    assert len(alerts) == 1
    a = alerts[0]
    assert (a["metric"], a["version"], a["arm"], a["window_mean"]) == ("fire_rate", "1.0.0", "all", 1.0)
    assert gov.show("tone")["rollout"]["stable"] == "1.0.0"  # guard off: alert only
