"""Hub in and out with the real huggingface_hub client against a Hub stand-in on 127.0.0.1 (tests/hub_server.py).

The CLI runs in subprocesses with HF_ENDPOINT pointing at the stand-in (huggingface_hub reads its settings at import
time), HF_HOME in a temporary folder, a fake HF_TOKEN, and HF_HUB_DISABLE_XET=1 (with hf_xet installed the client
would upload through the Xet protocol, which the stand-in does not speak; without it, it uses preupload + LFS +
commit, the path asserted here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from hub_server import FakeHub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "hf_TestTokenThatMustNeverBePrinted0123"
SRC_REPO = "src-org/tiny-qwen3-moe"
SOURCE_CARD = (
    "---\nlicense: apache-2.0\nlanguage:\n- en\ntags:\n- upstream-tag\n---\n\n# Tiny Qwen3-MoE\n\nUpstream words.\n"
)


@pytest.fixture(scope="module")
def hub():
    with FakeHub(token=TOKEN) as h:
        yield h


def env_for(hub: FakeHub, hf_home: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=hf_home, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1")
    env.update(extra)
    return env


def cli(env: dict[str, str], *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "moe_adapters", *args], capture_output=True, text=True, cwd=ROOT,
                       env=env, stdin=subprocess.DEVNULL, timeout=300)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    assert TOKEN not in p.stdout + p.stderr  # never printed, whatever happens
    return p


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def local_files(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def roundtrip(hub, hf_checkpoint, tmp_path_factory):
    """A checkpoint published as SRC_REPO on the stand-in (plus pickles that must never be fetched), converted from
    its Hub id to fused EP=2, then back to HF: the quick start up to `push`."""
    src = hf_checkpoint("qwen3_moe")
    files = local_files(src)
    files["README.md"] = SOURCE_CARD.encode()
    files["pytorch_model.bin"] = b"\x80\x04K\x01."  # a pickle: the allow/ignore patterns must skip it
    files["original/consolidated.00.pth"] = b"\x80\x04K\x02."
    commit = hub.add_repo(SRC_REPO, files)
    work = tmp_path_factory.mktemp("hub")
    env = env_for(hub, str(work / "hf_home"))
    ep2, back = str(work / "ep2"), str(work / "back")
    s = json.loads(cli(env, "convert", SRC_REPO, ep2, "--ep", "2", "--json").stdout)
    return {"src": src, "commit": commit, "env": env, "ep2": ep2, "back": back, "work": work, "summary": s,
            "back_summary": json.loads(cli(env, "convert", ep2, back, "--json").stdout)}


def test_convert_from_hub_id(hub, roundtrip):
    s, commit = roundtrip["summary"], roundtrip["commit"]
    assert s["hub_source"]["repo_id"] == SRC_REPO and s["hub_source"]["commit"] == commit
    snapshot = s["hub_source"]["path"]
    assert snapshot.startswith(str(roundtrip["work"] / "hf_home")) and snapshot.endswith(commit)  # HF_HOME respected
    fetched = set(local_files(snapshot))
    assert "pytorch_model.bin" not in fetched and not any(f.startswith("original/") for f in fetched)
    assert {"config.json", "model.safetensors.index.json", "README.md"} <= fetched
    assert not hub.requests_to("pytorch_model.bin") and not hub.requests_to("consolidated")  # not even asked for
    # the manifest records the Hub origin exactly; the way back writes the provenance record push relies on
    m = json.load(open(os.path.join(roundtrip["ep2"], "moe_adapters.json")))
    assert m["source"]["origin"]["repo_id"] == SRC_REPO and m["source"]["origin"]["revision"] == commit
    prov = json.load(open(os.path.join(roundtrip["back"], ".moe_adapters_provenance.json")))
    assert prov["converted_from"]["layout"] == "fused" and prov["converted_from"]["ep_size"] == 2
    assert prov["source"]["origin"]["repo_id"] == SRC_REPO
    # the round trip reproduced the published files, and verify accepts Hub ids (ORG/NAME@REV) too
    v = json.loads(cli(roundtrip["env"], "verify", f"{SRC_REPO}@{commit}", roundtrip["back"], "--json").stdout)
    assert v["identical"] and v["hub_a"]["commit"] == commit
    # inspect reads a Hub repo's headers only (range requests), and says what a full download would
    local_info = json.loads(cli(roundtrip["env"], "inspect", roundtrip["src"], "--json").stdout)
    cold = env_for(hub, str(roundtrip["work"] / "cold_inspect"))
    n = len(hub.requests)
    info = json.loads(cli(cold, "inspect", SRC_REPO, "--json").stdout)
    assert info["hub_source"]["commit"] == commit and info["hub_source"]["weights_downloaded"] is False
    for k in ("family", "layout", "ep_size", "num_experts", "moe_layers", "tensors", "files", "bytes", "dtypes"):
        assert info[k] == local_info[k], k
    weight_gets = [r for r in hub.requests[n:] if r.method == "GET" and r.path.endswith(".safetensors")]
    assert len(weight_gets) == local_info["files"] and all(r.range for r in weight_gets)  # headers only
    assert not any(n.endswith(".safetensors") for n in local_files(str(roundtrip["work"] / "cold_inspect")))


def test_push_uploads_exact_bytes_and_a_model_card(hub, roundtrip):
    back, env = roundtrip["back"], roundtrip["env"]
    n_put = len(hub.requests_to("/__lfs/", "PUT"))
    res = json.loads(cli(env, "push", back, "--repo-id", "test-org/qwen-roundtrip", "--json").stdout)
    assert res["created_repo"] and res["commit_oid"] == hub.head("test-org/qwen-roundtrip").oid
    assert res["verification"]["status"] == "identical"
    stored = hub.files("test-org/qwen-roundtrip")
    local = local_files(back)
    expected = {p for p in local if not p.startswith(".")} | {"README.md"}
    assert set(stored) - {".gitattributes"} == expected  # everything, and nothing else (no provenance record)
    for p, data in local.items():
        if not p.startswith(".") and p != "README.md":  # the source's card is replaced by the generated one
            assert stored[p] == data, p  # byte-identical
    # the weights went through LFS (batch + PUT), one PUT per distinct file content
    weights = {p for p in local if p.endswith(".safetensors")}
    assert len(hub.requests_to("/__lfs/", "PUT")) - n_put == len({local[p] for p in weights})
    assert all(hub.repos["test-org/qwen-roundtrip"].commits[res["commit_oid"]].files[p].lfs for p in weights)
    # the token was sent (Bearer) on the writes, and is printed nowhere (cli() asserts that)
    commits = hub.requests_to("/api/models/test-org/qwen-roundtrip/commit/main", "POST")
    assert commits and all(r.authorization == f"Bearer {TOKEN}" for r in commits)
    # the model card
    card = stored["README.md"].decode()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == SRC_REPO and meta["library_name"] == "transformers"
    assert {"moe-adapters", "qwen3_moe", "upstream-tag"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]  # carried from the source's card
    body = card.split("---\n", 2)[2]
    assert roundtrip["commit"] in body and "qwen3_moe" in body and "EP=2" in body
    assert f"{res['verification']['tensors']:,} tensors" in body and "identical" in body
    assert "## Original model card" in body and "Upstream words." in body
    assert res["verification"]["files_identical_to_source"] == f"{len(weights)}/{len(weights)}"
    assert roundtrip["commit"] in hub.head("test-org/qwen-roundtrip").message  # commit says what it was checked against

    # pushing again resumes/no-ops: nothing re-uploaded, no new commit
    n_put, n_commits = len(hub.requests_to("/__lfs/", "PUT")), len(hub.repos["test-org/qwen-roundtrip"].commits)
    p = cli(env, "--quiet", "push", back, "--repo-id", "test-org/qwen-roundtrip")
    assert p.stdout == p.stderr == ""  # --quiet: errors only (huggingface_hub's warnings too)
    again = json.loads(cli(env, "push", back, "--repo-id", "test-org/qwen-roundtrip", "--json").stdout)
    assert again["changed"] is False and again["commit_oid"] == res["commit_oid"]
    assert len(hub.requests_to("/__lfs/", "PUT")) == n_put
    assert len(hub.repos["test-org/qwen-roundtrip"].commits) == n_commits


def test_push_to_a_branch_private_repo(hub, roundtrip):
    res = json.loads(cli(roundtrip["env"], "push", roundtrip["back"], "--repo-id", "test-org/qwen-private",
                         "--private", "--revision", "v1", "--commit-message", "first cut", "--json").stdout)
    repo = hub.repos["test-org/qwen-private"]
    assert repo.private and res["revision"] == "v1"
    assert repo.branches["v1"] == res["commit_oid"] and repo.branches["main"] != res["commit_oid"]
    assert hub.head("test-org/qwen-private", "v1").message == "first cut"


def test_interrupted_push_resumes(hub, roundtrip):
    env, back = roundtrip["env"], roundtrip["back"]
    weights = {p: d for p, d in local_files(back).items() if p.endswith(".safetensors")}
    hub.lfs.clear()  # a Hub that holds none of these objects yet
    n_put = len(hub.requests_to("/__lfs/", "PUT"))
    hub.fail_commits = 1  # the files go up, then the commit fails
    line = one_error_line(cli(env, "push", back, "--repo-id", "test-org/resumed", check=2))
    assert "test-org/resumed" in line and "500" in line
    uploaded = len(hub.requests_to("/__lfs/", "PUT")) - n_put
    assert uploaded == len(set(weights.values())) and hub.head("test-org/resumed").message == "initial commit"
    res = json.loads(cli(env, "push", back, "--repo-id", "test-org/resumed", "--json").stdout)
    assert len(hub.requests_to("/__lfs/", "PUT")) - n_put == uploaded  # nothing sent twice
    assert res["changed"] and all(hub.files("test-org/resumed")[p] == d for p, d in weights.items())


def test_dry_run_uploads_nothing(hub, roundtrip):
    n = len(hub.requests)
    res = json.loads(cli(roundtrip["env"], "push", roundtrip["back"], "--repo-id", "test-org/dry", "--dry-run",
                         "--json").stdout)
    assert len(hub.requests) == n and "test-org/dry" not in hub.repos  # not one request reached the Hub
    local = {p for p in local_files(roundtrip["back"]) if not p.startswith(".")}
    assert {f["path"] for f in res["files"]} == local | {"README.md"}
    assert res["dry_run"] and res["commit_oid"] is None and res["model_card"].startswith("---\n")
    human = cli(roundtrip["env"], "push", roundtrip["back"], "--repo-id", "test-org/dry", "--dry-run").stdout
    assert "config.json" in human and "nothing uploaded" in human and "base_model: " + SRC_REPO in human
    assert len(hub.requests) == n


def test_push_refuses_unverified(hub, roundtrip, tmp_path):
    env, n = roundtrip["env"], len(hub.requests)
    # a folder that convert did not write: no recorded source
    plain = str(tmp_path / "plain")
    shutil.copytree(roundtrip["src"], plain)
    line = one_error_line(cli(env, "push", plain, "--repo-id", "test-org/refused", check=2))
    assert "--verify-against" in line and "--no-verify" in line
    # one flipped bit, against the recorded source and against a named one: exit 1, names the tensor
    tampered = str(tmp_path / "tampered")
    shutil.copytree(roundtrip["back"], tampered)
    from moe_adapters.checkpoint import open_checkpoint

    h = next(iter(open_checkpoint(tampered).headers.values()))
    e = h.tensors[-1]
    with open(h.path, "r+b") as f:
        f.seek(h.data_start + e.begin)
        b = f.read(1)
        f.seek(h.data_start + e.begin)
        f.write(bytes([b[0] ^ 0x01]))
    for extra in ([], ["--verify-against", roundtrip["src"]], ["--verify-against", roundtrip["ep2"]]):
        line = one_error_line(cli(env, "push", tampered, "--repo-id", "test-org/refused", *extra, check=1))
        assert e.name in line and "nothing was pushed" in line
    # not the standard layout
    line = one_error_line(cli(env, "push", roundtrip["ep2"], "--repo-id", "test-org/refused", check=2))
    assert "fused" in line and "convert" in line
    assert len(hub.requests) == n and "test-org/refused" not in hub.repos
    # a plain copy proven against the fused folder: accepted, and the card names the Hub source the manifest recorded
    res = json.loads(cli(env, "push", plain, "--repo-id", "test-org/via-fused", "--verify-against", roundtrip["ep2"],
                         "--dry-run", "--json").stdout)
    assert res["verification"]["status"] == "identical" and res["verification"]["against"] == "local folder ep2"
    assert yaml.safe_load(res["model_card"].split("---\n")[1])["base_model"] == SRC_REPO
    # --no-verify is the explicit way out, and the card says so
    res = json.loads(cli(env, "push", plain, "--repo-id", "test-org/unverified", "--no-verify", "--json").stdout)
    card = hub.files("test-org/unverified")["README.md"].decode()
    assert res["verification"]["status"] == "skipped" and "not verified" in card
    assert "base_model" not in yaml.safe_load(card.split("---\n")[1])  # no Hub source known: none claimed


def test_hub_errors_are_one_clear_line(hub, roundtrip, tmp_path):
    cold = str(tmp_path / "cold_home")
    dst = str(tmp_path / "dst")
    # offline with nothing cached
    line = one_error_line(cli(env_for(hub, cold, HF_HUB_OFFLINE="1"), "convert", SRC_REPO, dst, check=2))
    assert "HF_HUB_OFFLINE" in line and SRC_REPO in line and not os.path.exists(dst)
    # offline with the cache warm: works without a request
    n = len(hub.requests)
    warm = env_for(hub, roundtrip["env"]["HF_HOME"], HF_HUB_OFFLINE="1")
    info = json.loads(cli(warm, "inspect", SRC_REPO, "--json").stdout)
    assert info["hub_source"]["commit"] == roundtrip["commit"] and len(hub.requests) == n
    line = one_error_line(cli(warm, "push", roundtrip["back"], "--repo-id", "test-org/offline", check=2))
    assert "HF_HUB_OFFLINE=1 forbids pushing" in line and len(hub.requests) == n
    # no such repo / revision; Hub unreachable
    line = one_error_line(cli(env_for(hub, cold), "convert", "nobody/nothing", dst, check=2))
    assert "no Hub repo nobody/nothing" in line and "no local folder" in line
    line = one_error_line(cli(env_for(hub, cold), "inspect", SRC_REPO, "--revision", "nope", check=2))
    assert "no revision 'nope'" in line
    line = one_error_line(cli(env_for(hub, cold, HF_ENDPOINT="http://127.0.0.1:9"), "inspect", SRC_REPO, check=2))
    assert "cannot reach the Hub" in line
    # a private repo with no token: not found (the Hub does not reveal it)
    hub.add_repo("secret-org/hidden", local_files(roundtrip["src"]), private=True)
    no_token = env_for(hub, cold)
    no_token.pop("HF_TOKEN")
    line = one_error_line(cli(no_token, "inspect", "secret-org/hidden", check=2))
    assert "private" in line


def test_hub_ids_and_origins():
    from moe_adapters.hub import parse_hub_ref
    from moe_adapters.provenance import origin_of

    assert parse_hub_ref("Qwen/Qwen3-30B-A3B") == ("Qwen/Qwen3-30B-A3B", None)
    assert parse_hub_ref("deepseek-ai/DeepSeek-V3@refs/pr/1") == ("deepseek-ai/DeepSeek-V3", "refs/pr/1")
    for bad in ("./out", "/abs/path", "out", "a/b/c", "a--b/c", "a/b..c", "org/name@", "~/x", "a/b.git"):
        assert parse_hub_ref(bad) is None, bad
    c = "0123456789abcdef0123456789abcdef01234567"
    assert origin_of(f"/h/hub/models--Qwen--Qwen3-30B-A3B/snapshots/{c}") == {
        "path": f"/h/hub/models--Qwen--Qwen3-30B-A3B/snapshots/{c}", "repo_id": "Qwen/Qwen3-30B-A3B",
        "revision": c, "subfolder": None}
    assert origin_of("/data/qwen") == {"path": "/data/qwen"}


def test_model_card_front_matter():
    from moe_adapters.push import model_card, split_front_matter

    card = model_card(repo_id="me/x", family="mixtral", family_description="Mixtral", base_model=None,
                      source_repo=None, source_path="/home/me/secret/mixtral-local", source_commit=None,
                      converted="not recorded", verification={"status": "skipped", "reason": "--no-verify"}, files=3,
                      total_bytes=10, original_card="no front matter here\n")
    meta, body = split_front_matter(card)
    assert meta["library_name"] == "transformers" and "moe-adapters" in meta["tags"] and "base_model" not in meta
    assert "mixtral-local" in body and "/home/me" not in body  # a local source is named, its path is not
    assert "not verified" in body and "no front matter here" in body


def test_push_deletes_what_the_branch_held_that_the_folder_does_not(hub, roundtrip):
    """The branch ends up holding exactly the verified folder (and the card): an earlier push's extra files and
    differently named shards are deleted in the same commit, and the result lists them."""
    back, env = roundtrip["back"], roundtrip["env"]
    hub.add_repo("test-org/stale", {"notes.txt": b"draft", "model-00001-of-00009.safetensors": b"old shard",
                                    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
    res = json.loads(cli(env, "push", back, "--repo-id", "test-org/stale", "--json").stdout)
    assert sorted(res["removed"]) == ["model-00001-of-00009.safetensors", "notes.txt"]
    stored = hub.files("test-org/stale")
    expected = {p for p in local_files(back) if not p.startswith(".")} | {"README.md", ".gitattributes"}
    assert set(stored) == expected
    again = json.loads(cli(env, "push", back, "--repo-id", "test-org/stale", "--json").stdout)
    assert again["removed"] == [] and again["changed"] is False
    p = cli(env, "push", back, "--repo-id", "test-org/stale")  # human output: our summary says it, not a warning
    assert "already up to date" in p.stdout and "No files have been modified" not in p.stderr
