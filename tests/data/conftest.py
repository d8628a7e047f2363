import pytest

from tests.data.cases import CASE_IDS, write_dataset


@pytest.fixture(params=sorted(CASE_IDS))
def layout_dataset(request, tmp_path):
    """(layout name, dataset folder) for every supported layout."""
    return request.param, write_dataset(tmp_path / request.param, request.param)
