#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager v1.20.2 from Debian bookworm's `kubernetes` source
# package (the only source of an API server our CI machines can reach: PyPI, Debian and npm, no Go
# proxy), with Debian's Go 1.19, and takes etcd 3.4 and Prometheus 2.42 (the planner's optional signal) from
# Debian's packages.
#
# Usage: build_kube.sh CACHE_DIR   (as root, with apt access to Debian's mirror; output goes to CACHE_DIR.log)
# Once per machine: CACHE_DIR/bin/{etcd,kube-apiserver,kube-controller-manager,prometheus} and the stamp
# CACHE_DIR/$STAMP. A second caller waits on the lock and then finds the stamp. Everything is
# unpacked under CACHE_DIR: apt runs with its own lists/sources there, and no package is installed.
# Cold: 16-29 min measured on 2 cores shared with other work (docs/KUBERNETES.md); warm Go cache ~90 s.
set -euo pipefail
W=$(mkdir -p "$1" && cd "$1" && pwd)
STAMP=complete-v2  # tests/kube.py checks the same name; a new name rebuilds older caches
[ -e "$W/$STAMP" ] && exit 0
echo "build_kube.sh: building into $W (log: $W.log)"
exec >>"$W.log" 2>&1 9>"$W.lock"
flock 9
[ -e "$W/$STAMP" ] && exit 0
echo "=== build_kube.sh started $(date -u +%FT%TZ)"
K8S_DEB=1.20.5+really1.20.2-1.1+deb12u1
mkdir -p "$W/apt/lists/partial" "$W/apt/cache/archives/partial" "$W/apt/sources.list.d" "$W/deb" "$W/bin"

# 1. Debian sources and debs through apt's ordinary client, with a private state dir (no system change).
sed 's/^Types: deb$/Types: deb deb-src/' /etc/apt/sources.list.d/debian.sources > "$W/apt/sources.list.d/debian.sources"
APT=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$W/apt/sources.list.d"
     -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache" -o "APT::Sandbox::User=root" -qq)
apt-get "${APT[@]}" update
cd "$W"
[ -d kubernetes-1.20.2 ] || {
  apt-get "${APT[@]}" source --download-only "kubernetes=$K8S_DEB"
  tar xzf kubernetes_1.20.5+really1.20.2.orig.tar.gz
}
(cd deb && apt-get "${APT[@]}" download golang-1.19-go golang-1.19-src etcd-server golang-github-modern-go-reflect2-dev prometheus \
   && for f in *.deb; do dpkg-deb -x "$f" root; done)

# 2. Go 1.19 in GOPATH mode (k8s 1.20 predates module builds with -mod=vendor), reflect2 1.0.2 for Go >= 1.18.
export GOROOT=$W/deb/root/usr/lib/go-1.19 GOPATH=$W/gopath GOCACHE=$W/gocache GO111MODULE=off CGO_ENABLED=0 GOFLAGS=
export PATH=$GOROOT/bin:$PATH
mkdir -p "$GOPATH/src/k8s.io" && ln -sfn "$W/kubernetes-1.20.2" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
R=vendor/github.com/modern-go/reflect2
rm -rf $R && cp -r "$W/deb/root/usr/share/gocode/src/github.com/modern-go/reflect2" $R && rm -f $R/go.mod

# 3. The one generated file the tarball lacks (else "undefined: openapi.GetOpenAPIDefinitions").
go build -o "$W/bin/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
DIRS=$(find -H . -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) -type f -name '*.go' \
  | sed 's|^./staging/src|vendor|; s|^\./||' | grep -v -E '^vendor/k8s.io/(code-generator|sample-apiserver)/' \
  | xargs grep -l '^// *+k8s:' | xargs grep -l '+k8s:openapi-gen=' | xargs -n1 dirname | LC_ALL=C sort -u \
  | sed 's|^|k8s.io/kubernetes/|' | paste -sd,)
"$W/bin/openapi-gen" -i "$DIRS" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h hack/boilerplate/boilerplate.generatego.txt -r "$W/openapi.report"
diff "$W/openapi.report" api/api-rules/violation_exceptions.list

# 4. The binaries, stamped v1.20.2 (kubectl and helm read the version).
LD="-s -w"
for p in component-base/version client-go/pkg/version; do
  q=k8s.io/kubernetes/vendor/k8s.io/$p
  LD="$LD -X $q.gitVersion=v1.20.2 -X $q.gitMajor=1 -X $q.gitMinor=20 -X $q.gitTreeState=clean"
done
for c in kube-apiserver kube-controller-manager; do
  go build -trimpath -ldflags "$LD" -o "$W/bin/$c.tmp" "k8s.io/kubernetes/cmd/$c" && mv "$W/bin/$c.tmp" "$W/bin/$c"
done
cp "$W/deb/root/usr/bin/etcd" "$W/deb/root/usr/bin/prometheus" "$W/bin/"
"$W/bin/kube-apiserver" --version
date -u +%FT%TZ > "$W/$STAMP"
echo "=== build_kube.sh complete $(date -u +%FT%TZ)"
