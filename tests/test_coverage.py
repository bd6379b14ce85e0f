from conftest import VERSIONS

from rwkv_deploy.models import VERSIONS as SUPPORTED


def test_every_supported_version_is_tested():
    assert set(SUPPORTED) == set(VERSIONS), f"untested versions: {set(SUPPORTED) - set(VERSIONS)}"
