# kubesight: `make up` sets this machine up and runs everything locally; `make test` sets up
# and runs the whole suite. Both are idempotent: each step leaves a stamp and is skipped the
# second time unless its inputs changed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .state
KAFKA_VERSION ?= 3.9.1
KAFKA_LIBS := .cache/kafka-$(KAFKA_VERSION)/libs
# The real kube-apiserver for the Kubernetes metadata tests, built from Go modules
# (deploy/apiserver/go.mod pins the version); etcd is Debian's etcd-server.
GO ?= $(shell command -v go || echo /usr/local/go/bin/go)
KUBE_VERSION := $(shell sed -n 's/^\tk8s.io\/kubernetes \(v[0-9.]*\).*/\1/p' deploy/apiserver/go.mod)
APISERVER := .cache/kube-apiserver-$(KUBE_VERSION)
KUBE_VERSION_PKG := k8s.io/component-base/version
KUBE_VERSION_WORDS := $(subst ., ,$(KUBE_VERSION:v%=%))
KUBE_VERSION_LDFLAGS := -X $(KUBE_VERSION_PKG).gitVersion=$(KUBE_VERSION) \
	-X $(KUBE_VERSION_PKG).gitMajor=$(word 1,$(KUBE_VERSION_WORDS)) \
	-X $(KUBE_VERSION_PKG).gitMinor=$(word 2,$(KUBE_VERSION_WORDS))

APT_PACKAGES := clang llvm libbpf-dev libbpf1 bpftool libelf-dev zlib1g-dev make gcc \
	maven openjdk-17-jre-headless nginx-light wrk curl iptables nftables iproute2 python3-venv \
	redis-server redis-tools postgresql postgresql-contrib mariadb-server mariadb-client \
	dnsmasq-base bind9-dnsutils openssl conntrack etcd-server

.PHONY: setup up test bpf kafka venv apt clean lint bench apiserver

setup: apt venv bpf kafka

up: setup
	$(VENV)/bin/kubesight up

test: setup apiserver
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy kubesight probe streams sinks schemas

bench: setup
	$(PY) -m bench.run

apt: $(STAMPS)/apt
$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo ">> installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

bpf: apt
	$(MAKE) -s -C bpf

kafka: $(KAFKA_LIBS)/.complete
$(KAFKA_LIBS)/.complete: deploy/kafka/pom.xml
	@echo ">> fetching Apache Kafka $(KAFKA_VERSION) jars from Maven Central"
	mvn -q -B -f deploy/kafka/pom.xml -Dkafka.version=$(KAFKA_VERSION) \
		dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/$(KAFKA_LIBS) -DincludeScope=runtime
	@touch $@

# ~11 min and 2.4 GB (the linker) on 2 shared cores the first time (deploy/apiserver/README.md);
# seconds once built. Written to a temporary name first: an interrupted build leaves no binary.
apiserver: $(APISERVER)
$(APISERVER): deploy/apiserver/go.mod deploy/apiserver/go.sum
	@echo ">> building kube-apiserver $(KUBE_VERSION) from Go modules (first time: several minutes)"
	@mkdir -p .cache
	cd deploy/apiserver && GOFLAGS="-trimpath -mod=readonly" GOMAXPROCS=2 \
		$(GO) build -p 2 -ldflags='-s -w $(KUBE_VERSION_LDFLAGS)' \
		-o $(CURDIR)/$@.tmp k8s.io/kubernetes/cmd/kube-apiserver
	@mv $@.tmp $@
	@ln -sfn $(notdir $@) .cache/kube-apiserver

clean:
	$(MAKE) -s -C bpf clean
	rm -rf $(STAMPS)
