"""The ParallelCluster YAMLs pass aws-parallelcluster's own schema and offline validators; bad ones do not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fsdp_kit.errors import ConfigError
from fsdp_kit.launch.pcluster import check_cluster_yaml, fill_placeholders

pytest.importorskip("pcluster", reason="the [aws] extra (aws-parallelcluster) is not installed")

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "parallelcluster").glob("cluster*.yaml"))
VALUES = {"AWS_REGION": "us-east-1", "HEAD_SUBNET_ID": "subnet-0123456789abcdef0",
          "COMPUTE_SUBNET_ID": "subnet-0fedcba9876543210", "SSH_KEY_NAME": "my-key", "S3_BUCKET": "my-bucket",
          "FSDP_KIT_REPO": "https://github.com/example/fsdp_kit.git"}


def _filled(path: Path) -> str:
    return fill_placeholders(path.read_text(), VALUES)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_shipped_cluster_files_are_valid_once_filled(path):
    assert check_cluster_yaml(_filled(path)) == []


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_unreplaced_placeholders_are_rejected(path):
    with pytest.raises(ConfigError, match=r"unreplaced placeholder\(s\) \$\{AWS_REGION\}"):
        check_cluster_yaml(path.read_text())


def test_shipped_files_hold_no_credentials():
    for path in [*FILES, ROOT / "parallelcluster" / "node_setup.sh"]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|subnet-[0-9a-f]{8,}|\d{12}", text), path


def test_schema_errors_are_reported():
    bad = _filled(FILES[0]).replace("Os: ubuntu2204", "Os: windows95")
    with pytest.raises(ConfigError, match=r"schema rejects the file.*Os"):
        check_cluster_yaml(bad)


def test_efa_without_an_explicit_placement_group_is_rejected():
    bad = _filled(FILES[0]).replace("        PlacementGroup:\n          Enabled: true\n", "")
    with pytest.raises(ConfigError, match=r"placement group for EFA-enabled compute resources .* must be explicit"):
        check_cluster_yaml(bad)


def test_max_count_below_min_count_is_rejected():
    bad = _filled(FILES[0]).replace("MinCount: 0", "MinCount: 5")
    with pytest.raises(ConfigError, match="Max count must be greater than or equal to min count"):
        check_cluster_yaml(bad)


def test_cli_checks_a_file(tmp_path):
    sets = [arg for key, value in VALUES.items() for arg in ("--set", f"{key}={value}")]
    fsdp_kit = str(Path(sys.executable).parent / "fsdp-kit")
    ok = subprocess.run([fsdp_kit, "pcluster-check", str(FILES[0]), *sets], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid for ParallelCluster" in ok.stdout, ok.stderr
    missing = subprocess.run([fsdp_kit, "pcluster-check", str(FILES[0])], capture_output=True, text=True)
    assert missing.returncode == 2 and "unreplaced placeholder" in missing.stderr
    absent = subprocess.run([fsdp_kit, "pcluster-check", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert absent.returncode == 2 and "nope.yaml does not exist" in absent.stderr and "Traceback" not in absent.stderr
    bad_set = subprocess.run([fsdp_kit, "pcluster-check", str(FILES[0]), "--set", "REGION"], capture_output=True,
                             text=True)
    assert bad_set.returncode == 2 and "is not NAME=VALUE" in bad_set.stderr


# issue 21 §5: a file that is not YAML, or not text, is one line (it was 102 lines: three chained tracebacks)
BAD_FILES = [
    ("unclosed-bracket", b"Region: us-east-1\nImage:\n  Os: [alinux2\n", "bad.yaml is not valid YAML at line 4"),
    ("bad-indentation", b"Region: us-east-1\n Image: x\n", "bad.yaml is not valid YAML at line 2"),
    ("duplicate-key", b"Region: us-east-1\nRegion: us-west-2\n", "Duplicate key found: Region"),
    ("a-scalar", b"42\n", "bad.yaml holds a YAML int, not a ParallelCluster configuration"),
    ("not-utf8", b"Region: us-east-1\nImage:\n  Os: \xff\n", "bad.yaml is not UTF-8 text (byte 0xff on line 3)"),
]


@pytest.mark.parametrize(("content", "message"), [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_a_file_that_is_not_yaml_is_one_line(content, message, tmp_path):
    from helpers import run_cli

    (tmp_path / "bad.yaml").write_bytes(content)
    outcome = run_cli("pcluster-check", "bad.yaml", cwd=tmp_path)
    assert outcome.code == 2 and outcome.stdout == "", outcome.stderr
    assert outcome.stderr.count("\n") == 1 and outcome.error_lines, outcome.stderr
    assert message in outcome.error_lines[0] and "Fix:" in outcome.error_lines[0], outcome.stderr
