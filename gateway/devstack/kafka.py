"""The Kafka broker of the dev stack: resolved from Maven Central once, run from a plain classpath.

The jars live in a cache outside the repository (`~/.cache/kpg/kafka/<version>` unless
`KPG_DEV_CACHE_DIR` says otherwise) and are reused by every later start.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import string
import subprocess
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gateway.devstack.processes import Managed, StackError

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
_MIN_JAVA = 17


def default_cache_dir() -> Path:
    configured = os.environ.get("KPG_DEV_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kpg"


def _resource(name: str) -> str:
    return resources.files("gateway.devstack").joinpath("resources", name).read_text()


def find_java() -> str:
    """The `java` to use (JAVA_HOME first), after checking it is 17 or newer."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise StackError(
            "Java 17 or newer is needed to run the Kafka broker, and no `java` was found: "
            "install a JDK (Debian: `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME"
        )
    result = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):  # "1.8.0_392" style
        major = int(match.group(2))
    if major < _MIN_JAVA:
        raise StackError(
            f"Kafka 4 needs Java {_MIN_JAVA}+, but {java} is Java {major or 'unknown'}; set JAVA_HOME"
        )
    return java


def resolve_kafka(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """Download the broker's jars with Maven into the cache (once) and return the folder."""
    home = cache_dir / "kafka" / version
    libs = home / "libs"
    done = home / ".complete"
    if done.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "Maven (`mvn`) is needed once to fetch the Kafka broker from Maven Central: "
            "install it (Debian: `apt-get install maven`)"
        )
    home.mkdir(parents=True, exist_ok=True)
    staging = home / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    pom = string.Template(_resource("pom.xml")).safe_substitute()
    (home / "pom.xml").write_text(pom)
    log = home / "resolve.log"
    with log.open("w") as out:
        result = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(home / "pom.xml"),
                f"-Dkafka.version={version}",
                f"-Dlog4j.version={LOG4J_VERSION}",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        raise StackError(f"could not resolve Kafka {version} from Maven Central; see {log}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    done.write_text(version + "\n")
    return libs


@dataclass(frozen=True, slots=True)
class KafkaNode:
    state_dir: Path
    port: int
    controller_port: int

    @property
    def process(self) -> Managed:
        return Managed("kafka", self.state_dir)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        config_dir = self.state_dir / "kafka"
        data_dir = config_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        # One fixed cluster id per data dir, so restarts reuse the formatted storage.
        cluster_file = config_dir / "cluster.id"
        if not cluster_file.exists():
            cluster_file.write_text(_cluster_id())
        properties = string.Template(_resource("server.properties")).substitute(
            port=self.port, controller_port=self.controller_port, data_dir=data_dir
        )
        config = config_dir / "server.properties"
        config.write_text(properties)
        (config_dir / "log4j2.properties").write_text(_resource("log4j2.properties"))
        return config

    def start(self, java: str, libs: Path) -> None:
        config = self.write_config()
        config_dir = config.parent
        classpath = f"{libs}/*"
        log_file = self.state_dir / "logs" / "kafka-broker.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        jvm = [
            java,
            "-Xms256m",
            "-Xmx512m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={config_dir / 'log4j2.properties'}",
            f"-Dkpg.log.file={log_file}",
            "-cp",
            classpath,
        ]
        cluster_id = (config_dir / "cluster.id").read_text().strip()
        # `--cluster-id=<id>`, not `-t <id>`: a random id may start with "-", which argparse reads as a flag.
        storage_format = ["kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}"]
        formatted = subprocess.run(
            [*jvm, *storage_format, "-c", str(config), "-g"],
            capture_output=True,
            text=True,
            check=False,
        )
        if formatted.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{formatted.stdout}{formatted.stderr}")
        self.process.start([*jvm, "kafka.Kafka", str(config)])


def _cluster_id() -> str:
    # Kafka's cluster ids are 16 random bytes in URL-safe base64 without padding.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
