"""Which process group a run joins, decided from the environment alone (nothing is initialised): a
multi-host Cloud TPU VM joins by itself, and a machine that is not a TPU VM never asks the network."""

import io
import urllib.error
import urllib.request

import pytest
from jax._src import cloud_tpu_init

from rlhf_jax import distributed
from rlhf_jax.errors import ConfigError


def _metadata(monkeypatch, endpoints: str | None):
    """The GCE metadata server as a Cloud TPU VM sees it (None: unreachable); returns the URLs asked."""
    asked = []

    def urlopen(request, timeout):
        asked.append(request.full_url)
        assert request.get_header("Metadata-flavor") == "Google"
        if endpoints is None:
            raise urllib.error.URLError("Name or service not known")
        return io.BytesIO(endpoints.encode())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


@pytest.fixture
def tpu_vm(monkeypatch):
    """What `import jax` concludes on a Cloud TPU VM (TPU chips on PCI, libtpu installed); setattr fails if
    JAX no longer has the flag distributed.cloud_tpu_vm_hosts reads."""
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)


def test_a_multi_host_cloud_tpu_vm_joins_without_the_variable(tpu_vm, monkeypatch):
    # worker-network-endpoints in both of its formats: name:id:ip triples, and plain hostnames
    asked = _metadata(monkeypatch, "t1v-n-0:0:10.0.0.2,t1v-n-1:1:10.0.0.3,t1v-n-2:2:10.0.0.4,t1v-n-3:3:10.0.0.5")
    assert distributed.plan({}) == {}
    assert asked == ["http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints"]
    _metadata(monkeypatch, "host-0,host-1")
    assert distributed.plan({}) == {}


def test_a_single_host_cloud_tpu_vm_stays_one_process(tpu_vm, monkeypatch):
    asked = _metadata(monkeypatch, "t1v-n-0:0:10.0.0.2\n")
    assert distributed.plan({"GCE_METADATA_IP": "169.254.169.254"}) is None
    assert asked[0].startswith("http://169.254.169.254/")


def test_the_metadata_server_is_asked_only_on_a_tpu_vm_and_only_when_nothing_else_decides(tpu_vm, monkeypatch):
    asked = _metadata(monkeypatch, "a,b")
    assert distributed.plan({"TPU_SKIP_MDS_QUERY": "1"}) is None  # JAX's own opt-out of the query
    assert distributed.plan({"RLHF_JAX_DISTRIBUTED": "0"}) is None
    assert distributed.plan({"SLURM_NTASKS": "4"}) == {}
    assert distributed.plan({"TPU_WORKER_HOSTNAMES": "a"}) is None  # GKE: the variable says it all
    assert distributed.plan({"TPU_PROCESS_ADDRESSES": "a:8476,b:8476"}) == {}
    assert distributed.plan({"TPU_WORKER_HOSTNAMES": "a", "MEGASCALE_NUM_SLICES": "2"}) == {}
    assert asked == []
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)  # a CPU or GPU machine
    assert distributed.plan({}) is None
    assert asked == []


def test_an_unreachable_metadata_server_names_the_variable(tpu_vm, monkeypatch):
    _metadata(monkeypatch, None)
    with pytest.raises(ConfigError, match="RLHF_JAX_DISTRIBUTED=1 on every host .* RLHF_JAX_DISTRIBUTED=0"):
        distributed.plan({})
