# The two commands a fresh machine needs (see README):
#   make demo   - set up, then run the whole path on an embedded default and print similar cases
#   make test   - set up what the tests talk to, then run the test suite
.PHONY: demo test lint lint-deploy lock-image protos check-protos openapi bench dcmtk-scp

demo:
	./scripts/bootstrap
	.venv/bin/cbmir demo

test:
	./scripts/bootstrap --test
	.venv/bin/pytest -q

# CI: lint, format, types and the dependency rule (its contracts are in pyproject.toml).
lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports
	$(MAKE) lint-deploy

# CI: Helm lint/template + kubernetes-validate, hadolint, the image's lock files, docker compose config.
lint-deploy:
	.venv/bin/python scripts/lint_deploy.py

# Re-pin the Docker image's Python packages (with hashes) after a dependency changes in pyproject.toml.
lock-image:
	.venv/bin/python scripts/lock_image.py

protos:
	PYTHON=.venv/bin/python ./scripts/gen-protos

# CI: the committed stubs must be exactly what proto/ generates.
check-protos: protos
	git diff --exit-code -- services/grpc_gen || (echo "generated stubs drift from proto/: run 'make protos' and commit"; exit 1)
	test -z "$$(git status --porcelain -- services/grpc_gen)"

# The gateway's OpenAPI document, committed as docs/openapi.json (a test fails when it drifts).
openapi:
	.venv/bin/python -m services.gateway.openapi docs/openapi.json

# The listener's dcmtk network side (CBMIR_DICOM_RECEIVER=dcmtk), beside the venv's Python, where the
# listener looks first. Needs g++ and Debian's libdcmtk-dev (the bootstrap's --test installs both).
DCMTK_SCP := .venv/bin/cbmir-dcmtk-scp
dcmtk-scp: $(DCMTK_SCP)
$(DCMTK_SCP): native/dcmtk-scp/cbmir-dcmtk-scp.cc
	$(CXX) -O2 -std=c++17 -Wall -Wextra -Werror -o $@ $< -ldcmnet -ldcmdata -loflog -lofstd -lcrypto -pthread

bench:
	.venv/bin/python benchmarks/search.py --quick
	.venv/bin/python benchmarks/ingest.py --quick
