# Development targets. `make test` is the test command; .ci/run runs test,
# lint, cover, bench-smoke and demo.

GO ?= go

# bash with pipefail, so that `go test ... | tee` fails when go test does.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

# staticcheck 2026.2.2, pinned by its module version: the newest release on
# the Go module proxy that supports Go 1.26. (The proxy serves it as v0.8.2;
# it refuses the 2026.2.2 spelling here.)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

# benchstat, pinned.
BENCHSTAT := v0.0.0-20260908200009-22c9c6c9d4da

# The lowest total coverage of the root package that `make cover` accepts.
COVER_MIN := 90

.PHONY: all test lint cover bench bench-smoke compare fuzz load chaos-fuzz demo tidy-check alerts fleet

all: test lint

# The root module and the nested ones: the benchmarks comparison, the chaos
# scenarios, the Redis store, the gRPC interceptors and the Prometheus and
# gRPC examples each have their own go.mod, so that their dependencies never
# reach the core's users.
MODULES := . internal/benchmarks internal/chaos internal/plots redisstore resiliencegrpc examples/prometheus examples/grpcauth internal/browser

test:
	@for m in $(MODULES); do \
		echo "== go test -race ./... in $$m"; \
		(cd $$m && $(GO) test -race -count=1 ./...) || exit 1; \
	done

lint:
	@for m in $(MODULES); do \
		echo "== vet and staticcheck in $$m"; \
		(cd $$m && $(GO) vet ./... && $(GO) run $(STATICCHECK) ./...) || exit 1; \
	done

cover:
	$(GO) test -count=1 -coverprofile=cover.out .
	@$(GO) tool cover -func=cover.out | awk -v min=$(COVER_MIN) ' \
		/^total:/ { total = $$NF; sub(/%/, "", total) } \
		END { \
			if (total == "") { print "cover: no total in the profile"; exit 1 } \
			printf "total coverage: %s%% (minimum %s%%)\n", total, min; \
			if (total + 0 < min + 0) { print "cover: below the minimum"; exit 1 } \
		}'

bench:
	$(GO) test -run='^$$' -bench=. -benchmem -count=6 . | tee bench.txt

bench-smoke:
	$(GO) test -run='^$$' -bench=. -benchtime=1x ./...
	cd internal/benchmarks && $(GO) test -run='^$$' -bench=. -benchtime=1x ./...
	cd redisstore && $(GO) test -run='^$$' -bench=. -benchtime=1x ./...
	cd resiliencegrpc && $(GO) test -run='^$$' -bench=. -benchtime=1x ./...

# The side-by-side comparison with failsafe-go and a hand-written stack.
compare:
	cd internal/benchmarks && $(GO) test -run='^$$' -bench=. -benchmem -count=6 . | tee bench.txt
	cd internal/benchmarks && $(GO) run golang.org/x/perf/cmd/benchstat@$(BENCHSTAT) bench.txt

# Each fuzz target of the root package in turn: go test -fuzz takes one;
# then resiliencegrpc's parser of the pushback trailer.
fuzz:
	@list=$$($(GO) test -list '^Fuzz' .) || { echo "$$list"; exit 1; }; \
	targets=$$(echo "$$list" | grep '^Fuzz' || true); \
	if [ -z "$$targets" ]; then echo "fuzz: no fuzz targets in the root package"; exit 0; fi; \
	for t in $$targets; do \
		echo "fuzz: $$t"; \
		$(GO) test -run='^$$' -fuzz="^$$t$$" -fuzztime=10s . || exit 1; \
	done
	cd resiliencegrpc && $(GO) test -run='^$$' -fuzz='^FuzzParsePushback$$' -fuzztime=10s .

# The examples, bounded, each run as a user would: outputs of llm and auth
# are deterministic, so a second run must print the same.
# The load scenario asserts its rate (1000 calls/s) only without -race.
load:
	cd internal/chaos && $(GO) test -count=1 -run '^TestLoad$$' -v .
	cd internal/chaos && $(GO) test -count=1 -run '^TestAdaptiveLimit$$' -v .

# Issue 18: exactly one probe per failed half-open round across three
# replicas on a real Redis, in step and with one replica late, five times
# over under -race (about 30s), since a race shows in one run of many;
# and the fleet's doubling of its open period.
fleet:
	cd redisstore && $(GO) test -race -count=5 -run '^(TestFleetOneProbePerFailedRound|TestLateTripEndsWithTheSharedOpen|TestFleetDoublesTheOpenPeriod)$$' -v .

# Short fuzzes of the whole stack's invariants and of the registry's bounds.
chaos-fuzz:
	cd internal/chaos && $(GO) test -run='^$$' -fuzz='^FuzzCompose$$' -fuzztime=10s .
	$(GO) test -run='^$$' -fuzz='^FuzzRegistryBounds$$' -fuzztime=15s .

demo:
	$(GO) run ./examples/llm
	$(GO) run ./examples/auth
	@a=$$($(GO) run ./examples/auth) && b=$$($(GO) run ./examples/auth) && [ "$$a" = "$$b" ] \
		|| { echo "demo: examples/auth output is not deterministic"; exit 1; }
	$(GO) run ./examples/admin -duration 2s -addr 127.0.0.1:0
	cd examples/grpcauth && $(GO) run .
	$(GO) build -o /dev/null ./cmd/resilience

# The Prometheus rules of dashboards/alerts.yml: checked, then their unit
# tests in dashboards/alerts_test.yml, with promtool from Debian's
# prometheus package.
PROMTOOL ?= promtool

alerts:
	@command -v $(PROMTOOL) >/dev/null 2>&1 || { echo "alerts: $(PROMTOOL) not found: apt-get install prometheus"; exit 1; }
	$(PROMTOOL) check rules dashboards/alerts.yml
	$(PROMTOOL) test rules dashboards/alerts_test.yml

tidy-check:
	@for m in $(MODULES); do \
		(cd $$m && $(GO) mod tidy && git diff --exit-code go.mod go.sum) || exit 1; \
	done
