"""The config file and the checks of ServerConfig (no server: plain values)."""

from __future__ import annotations

import pytest

from cellmux.config import ConfigError, ServerConfig, load_config_file


def test_the_cellmux_table_or_the_top_level_is_read(tmp_path):
    table = tmp_path / "table.toml"
    table.write_text('[cellmux]\npool_size = 5\nallow_origins = ["https://a\\\\.example"]\n')
    top = tmp_path / "top.toml"
    top.write_text("pool_size = 7\n")
    assert load_config_file(table) == {"pool_size": 5, "allow_origins": ["https://a\\.example"]}
    config = ServerConfig(**load_config_file(table))
    assert config.pool_size == 5 and config.allow_origins == ("https://a\\.example",)
    assert ServerConfig(**load_config_file(top)).pool_size == 7


def test_unknown_settings_are_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[cellmux]\npool_size = 1\npol_size = 2\nzeta = 3\n")
    with pytest.raises(ConfigError, match=r"unknown settings in .*c\.toml: pol_size, zeta$"):
        load_config_file(path)


@pytest.mark.parametrize("text", [None, "pool_size = = 1\n"])
def test_a_missing_or_broken_file_is_a_config_error(tmp_path, text):
    path = tmp_path / "c.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=r"^cannot read config file .*c\.toml: "):
        load_config_file(path)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"pool_size": -1}, "pool_size must not be negative, not -1"),
        ({"max_kernels": 0}, "max_kernels must be positive, not 0"),
        ({"kernel_uid_range": [5, 4]}, "kernel_uid_range must be [first, last] uids above 0"),
        ({"kernel_uid_range": [0, 4]}, "kernel_uid_range must be [first, last] uids above 0"),
        ({"shared_root": "/no/such/dir"}, "shared_root must be an existing directory"),
        (
            {"public": True, "kernel_page_merging": True},
            "kernel_page_merging cannot be on in public mode",
        ),
    ],
)
def test_values_the_server_cannot_use_are_refused_with_the_settings_name(setting, message):
    with pytest.raises(ConfigError) as raised:
        ServerConfig(**setting)
    assert str(raised.value).startswith(message)


def test_the_defaults_are_those_docs_operations_md_lists():
    config = ServerConfig()
    assert (config.host, config.port, config.pool_size, config.max_kernels) == (
        "127.0.0.1",
        8800,
        2,
        200,
    )
    assert config.replay_bytes == 8 * 1024 * 1024 and config.kernel_uid_range == (200000, 299999)
