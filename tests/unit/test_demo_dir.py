"""The demo's configuration directory: one demo at a time, its files private and removed on exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.dev.demo import DemoDirBusy, demo_dir


def test_a_second_demo_is_refused_the_directory_and_files_go_on_exit(tmp_path: Path) -> None:
    where = tmp_path / "parafort-demo"
    with demo_dir(where) as held:
        assert where.stat().st_mode & 0o777 == 0o700
        (held / "proxy.yaml").write_text("listen: {}\n")
        with pytest.raises(DemoDirBusy, match="another demo is running"), demo_dir(where):
            pass
        assert (held / "proxy.yaml").exists()  # the refused one removed nothing
    assert not (where / "proxy.yaml").exists()
    with demo_dir(where):  # free again
        pass
