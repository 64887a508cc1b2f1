"""gridsock: sockets that reach every node of a computing grid."""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "gridsock" / "__init__.py").read_text()).group(1)

setup(
    name="gridsock",
    version=VERSION,
    description="Sockets across NAT, firewalls and private clusters: a PadicoTM-style meta-communication framework",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=[
        "gridsock",
        "gridsock.bootstrap",
        "gridsock.components",
        "gridsock.testing",
        "gridsock.personalities",
        "gridsock.personalities._site",
        "gridsock.shims",
    ],
    package_dir={
        "gridsock.personalities": "personalities",
        "gridsock.personalities._site": "personalities/_site",
        "gridsock.shims": "shims",
    },
    install_requires=[
        'gevent>=26; python_version >= "3.10"',
        'gevent==25.9.1; python_version < "3.10"',
        "cryptography>=42",
        "pyopenssl>=24",
        "paramiko>=3.4",
        "pysocks>=1.7",
        "lz4>=4",
        "prometheus_client>=0.20",
        'tomli>=2; python_version < "3.11"',
        # Progress bars of long CLI work (gridsock transfer).
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "requests>=2.28", "pycurl>=7.45.3"],
        # The gridsock:// comm backend (gridsock.shims.dask); the tests also use dask.array.
        "dask": ["dask[array,distributed]>=2024.8.0"],
        # mypy and the stubs of the dependencies that ship no types (tox -e typecheck, mypy.ini).
        "typecheck": [
            "mypy==2.4.1",
            "types-gevent==26.9.0.20261107",
            "types-greenlet==3.5.0.20260518",
            "types-paramiko==5.1.0.20261030",
            "types-PySocks==1.7.1.20261115",
            "types-tqdm==4.70.0.20261106",
        ],
    },
    entry_points={
        "console_scripts": ["gridsock = gridsock.cli:main"],
        # gevent's monkey.patch_all() after ours: put the personality back on top of gevent's.
        "gevent.plugins.monkey.did_patch_all": ["gridsock = gridsock.personalities.monkey:gevent_did_patch_all"],
        # gridsock://NODE:PORT addresses for Dask (distributed loads the Backend class by scheme).
        "distributed.comm.backends": ["gridsock = gridsock.shims.dask:GridsockBackend"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Networking",
        "Topic :: System :: Distributed Computing",
    ],
)
