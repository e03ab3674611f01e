from __future__ import annotations

from pathlib import Path

import pytest

from aiva.config import (
    PROFILES,
    Config,
    format_size,
    load_config,
    parse_size,
    write_default_config,
)
from aiva.errors import ConfigError, InvalidValue
from aiva.paths import aiva_home


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MB", 512 << 20), ("8g", 8 << 30), ("2GiB", 2 << 30), ("1.5g", 3 << 29),
     ("100", 100), ("64k", 64 << 10), (4096, 4096)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12XB", "-1GB", "", "GB"])
def test_parse_size_rejects_garbage(bad: str) -> None:
    with pytest.raises(InvalidValue) as exc:
        parse_size(bad)
    assert exc.value.hint and "512MB" in exc.value.hint


def test_format_size() -> None:
    assert format_size(8 << 30) == "8GB"
    assert format_size(512 << 20) == "512MB"
    assert format_size(10) == "10B"


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "none.yaml")
    assert cfg == Config()
    assert cfg.networking.bridge_name == "mcp-br0"
    assert cfg.networking.subnet == "172.16.0.0/24"


def test_seed_shaped_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        'version: "1.0"\n'
        "defaults:\n  cpus: 2\n  memory: 4GB\n  disk: 20GB\n  cache_strategy: writeback\n"
        "platform:\n  linux:\n    firecracker_binary: /opt/fc\n"
        "  macos:\n    lima_instance: aiva-host\n    lima_cpus: 8\n    lima_memory: 16GB\n"
        "networking:\n  bridge_name: br9\n  subnet: 10.9.0.0/24\n  dns_servers: [1.1.1.1]\n"
    )
    cfg = load_config(path)
    assert cfg.defaults.cpus == 2
    assert cfg.defaults.memory == "4GB"
    assert cfg.platform.linux.firecracker_binary == "/opt/fc"
    assert cfg.networking.bridge_name == "br9"


def test_bad_value_names_key_and_value(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("defaults:\n  memory: lots\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "defaults.memory" in str(exc.value) and "'lots'" in str(exc.value)
    assert str(path) in str(exc.value)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("networking:\n  bridge: br0\n")
    with pytest.raises(ConfigError, match=r"networking\.bridge: unknown key"):
        load_config(path)


def test_bad_yaml_and_bad_shape(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("defaults: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_profiles_from_the_design() -> None:
    cfg = Config()
    assert cfg.profile("minimal") == PROFILES["minimal"]
    assert (cfg.profile("standard").cpus, cfg.profile("standard").memory) == (4, "8GB")
    assert cfg.profile("performance").disk == "100GB"
    with pytest.raises(InvalidValue, match="unknown profile"):
        cfg.profile("huge")


def test_aiva_home_moves_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path / "h"))
    assert aiva_home() == tmp_path / "h"
    written = write_default_config()
    assert written == tmp_path / "h" / "config.yaml"
    assert load_config() == Config()


def test_cost_and_collector_sections() -> None:
    from pydantic import ValidationError

    from aiva.observe.collector import Price, price_for

    cfg = Config.model_validate(
        {"cost": {"digitalocean": {"cpu_hour": 0.009, "gb_hour": 0.0045}}})
    assert price_for("digitalocean", cfg) == Price(0.009, 0.0045)
    assert price_for("docker", cfg) == Price()
    assert cfg.collector.interval == 5
    with pytest.raises(ValidationError):
        Config.model_validate({"cost": {"docker": {"cpu_hr": 1}}})


def test_mcp_allow_dirs_must_be_absolute(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("mcp:\n  allow_dirs: [/srv/work, ~/projects]\n")
    assert load_config(path).mcp.allow_dirs == ["/srv/work", "~/projects"]
    path.write_text("mcp:\n  allow_dirs: [projects]\n")
    with pytest.raises(ConfigError, match=r"mcp\.allow_dirs\.0 = 'projects': 'projects' "
                                          "is not an absolute path"):
        load_config(path)
