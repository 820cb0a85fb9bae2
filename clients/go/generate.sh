#!/usr/bin/env bash
# Regenerates clients/go/kpgv1 from proto/kpg/v1 (the one source of truth). Generated code is never
# edited by hand. Installs the pinned plugins into .tools/bin when missing or of another version;
# buf itself comes from `make .tools/bin/buf`.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
BIN=$ROOT/.tools/bin
PROTOC_GEN_GO_VERSION=v1.36.12        # keep equal to google.golang.org/protobuf in go.mod
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2

install_plugin() { # <binary> <package> <version> <what `--version` prints>
  if [[ "$("$BIN/$1" --version 2>/dev/null || true)" != "$4" ]]; then
    GOBIN=$BIN go install "$2@$3"
  fi
}
install_plugin protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go \
  "$PROTOC_GEN_GO_VERSION" "protoc-gen-go $PROTOC_GEN_GO_VERSION"
install_plugin protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc \
  "$PROTOC_GEN_GO_GRPC_VERSION" "protoc-gen-go-grpc ${PROTOC_GEN_GO_GRPC_VERSION#v}"

rm -f kpgv1/*.pb.go
"$BIN/buf" generate "$ROOT" --template buf.gen.yaml
