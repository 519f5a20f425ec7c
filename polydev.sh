#!/usr/bin/env bash
# Polydev Remote: set up this machine, build, and run.
#
#   ./polydev.sh up      install what is missing, build, then run `polydev up`
#   ./polydev.sh test    install what is missing, build, then run every test
#   ./polydev.sh setup   install and build only
#
# Idempotent: every step checks before it acts. Heavy artifacts (guest kernel,
# initramfs) are cached under ~/.cache/polydev and rebuilt only when an input
# changes.
set -euo pipefail
cd "$(dirname "$0")"

VHOST_DEVICE_VSOCK_VERSION=0.3.0
export PATH="$HOME/.cargo/bin:$PATH"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

step() { printf '\n==> %s\n' "$*"; }

need_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  printf '%s\n' "${missing[@]}"
}

setup_apt() {
  step "system packages"
  # QEMU 10 comes from bookworm-backports on Debian 12 (bookworm's 7.2 lacks
  # `migrate file:`); on newer Debian the default suite has it.
  local codename=""
  codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
  local target=()
  if [ "$codename" = bookworm ]; then
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      echo "adding bookworm-backports to apt sources"
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        | $SUDO tee /etc/apt/sources.list.d/polydev-backports.sources >/dev/null
      $SUDO apt-get update -q
    fi
    target=(-t bookworm-backports)
  fi
  # debootstrap and erofs-utils build the golden images (`polydev image build`);
  # systemd brings systemd-analyze, which checks deploy/systemd in the tests;
  # g++: libfuzzer-sys (the fuzz targets, fuzz/) compiles libFuzzer's C++;
  # curl: the custody e2e plays the person's browser at the test provider.
  local pkgs=(qemu-system-x86 qemu-system-data qemu-utils e2fsprogs dpkg cpio postgresql debootstrap erofs-utils systemd g++ curl)
  mapfile -t missing < <(need_apt "${pkgs[@]}")
  if [ "${#missing[@]}" -gt 0 ] && [ -n "${missing[0]}" ]; then
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${target[@]}" "${missing[@]}"
  else
    echo "all present: ${pkgs[*]}"
  fi
  # The guest kernel and busybox are fetched with `apt-get download`, which
  # needs package lists; make sure they exist.
  if ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q Candidate; then
    $SUDO apt-get update -q
  fi
}

setup_cargo_tools() {
  step "cargo tools"
  if ! vhost-device-vsock --version 2>/dev/null | grep -q "$VHOST_DEVICE_VSOCK_VERSION"; then
    echo "installing vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION"
    cargo install vhost-device-vsock --version "$VHOST_DEVICE_VSOCK_VERSION" --locked
  else
    echo "vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION present"
  fi
  # The fuzz targets (fuzz/) are built by cargo-fuzz.
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
  else
    echo "cargo-fuzz present"
  fi
}

setup_oidc() {
  step "test OpenID Connect provider (tests/oidc)"
  # The controller's JWT tests run panva/oidc-provider under Node.js.
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "installing nodejs and npm"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends nodejs npm
  fi
  local major
  major="$(node -p 'process.versions.node.split(".")[0]')"
  if [ "$major" -lt 20 ]; then
    echo "warning: node $(node --version) is older than the 20.19 oidc-provider needs; install a newer Node.js" >&2
  fi
  # Reinstall only when node_modules is missing or the lock file changed.
  local want have=""
  want="$(sha256sum tests/oidc/package-lock.json | cut -d' ' -f1)"
  [ -f tests/oidc/node_modules/.polydev-lock ] && have="$(cat tests/oidc/node_modules/.polydev-lock)"
  if [ "$want" != "$have" ]; then
    npm ci --prefix tests/oidc --no-audit --no-fund --cache "$HOME/.cache/polydev/npm"
    echo "$want" > tests/oidc/node_modules/.polydev-lock
  else
    echo "tests/oidc/node_modules up to date"
  fi
}

# The dashboard (web/): its npm packages (Vite, Preact, noVNC, xterm.js, and
# for its browser tests playwright-core and axe-core), then its build into
# web/dist, which the release binary embeds. Chromium for those tests is
# Debian's (nothing downloads browsers here).
setup_web() {
  step "dashboard (web/)"
  mapfile -t missing < <(need_apt chromium)
  if [ "${#missing[@]}" -gt 0 ] && [ -n "${missing[0]}" ]; then
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  local want have=""
  want="$(sha256sum web/package-lock.json | cut -d' ' -f1)"
  [ -f web/node_modules/.polydev-lock ] && have="$(cat web/node_modules/.polydev-lock)"
  if [ "$want" != "$have" ]; then
    npm ci --prefix web --no-audit --no-fund --cache "$HOME/.cache/polydev/npm"
    echo "$want" > web/node_modules/.polydev-lock
  else
    echo "web/node_modules up to date"
  fi
  # Rebuilt when any source of the page changed (the stamp is the hash of
  # every file under web/ but node_modules, dist and the browser tests).
  want="$(cd web && find . -path ./node_modules -prune -o -path ./dist -prune -o -path ./e2e -prune -o -type f -print \
    | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
  have="$(cat web/node_modules/.polydev-build 2>/dev/null || true)"
  if [ "$want" != "$have" ] || [ ! -f web/dist/index.html ]; then
    npm run --prefix web build
    echo "$want" > web/node_modules/.polydev-build
  else
    echo "web/dist up to date"
  fi
}

SCHEMATHESIS_VERSION=4.32.5

setup_schemathesis() {
  step "Schemathesis (tests/tests/api_schemathesis.rs)"
  # The API fuzz test runs Schemathesis from PyPI in its own venv, made with
  # Debian's python3 (its venv module is the python3-venv package).
  mapfile -t missing < <(need_apt python3-venv)
  if [ "${#missing[@]}" -gt 0 ] && [ -n "${missing[0]}" ]; then
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  # Recreated only when the pin changes (the stamp holds the pinned version).
  local venv="$HOME/.cache/polydev/schemathesis"
  if [ "$(cat "$venv/.polydev-pin" 2>/dev/null)" != "$SCHEMATHESIS_VERSION" ] || [ ! -x "$venv/bin/st" ]; then
    echo "installing schemathesis==$SCHEMATHESIS_VERSION into $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
    echo "$SCHEMATHESIS_VERSION" > "$venv/.polydev-pin"
  else
    echo "schemathesis $SCHEMATHESIS_VERSION present"
  fi
}

build() {
  step "build"
  cargo build --release -p polydev
  # The guest agent is PID 1 of an initramfs without a libc: link it
  # statically. So is the test CLI (crates/testcli), which tests copy into
  # their VMs (the production images do not carry it).
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -p polydev-guest -p polydev-testcli --target x86_64-unknown-linux-gnu
  step "guest kernel and initramfs"
  ./target/release/polydev image kernel
  step "golden images"
  # Cached by the recipe's hash: instant when image/recipe.toml is
  # unchanged; cold about 4 minutes (cli) and 6-13 minutes (browser) on a
  # 2-core machine, with progress for each step.
  ./target/release/polydev image build cli
  ./target/release/polydev image build browser
}

setup() {
  setup_apt
  setup_cargo_tools
  setup_oidc
  setup_web
  setup_schemathesis
  build
  step "doctor"
  ./target/release/polydev doctor || true
}

FUZZ_SECONDS="${POLYDEV_FUZZ_SECONDS:-20}"

# Each fuzz target for a bounded time from its committed corpus (new inputs
# go to a scratch copy, so the tree stays clean); a crash fails the run and
# leaves its input under fuzz/artifacts/<target>/.
run_fuzz() {
  step "fuzz targets (${FUZZ_SECONDS} s each)"
  # cargo-fuzz needs nightly flags (-Z sanitizer); the stable compiler
  # accepts them with RUSTC_BOOTSTRAP.
  # Their instrumented build is kept under the cache (it outlives a fresh
  # checkout, so a second run only rebuilds what changed).
  local t scratch target_dir="$HOME/.cache/polydev/fuzz-target"
  for t in $(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list); do
    scratch="$(mktemp -d)"
    cp -r "fuzz/corpus/$t/." "$scratch/"
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O --target-dir "$target_dir" "$t" "$scratch" -- \
      -max_total_time="$FUZZ_SECONDS" -print_final_stats=1)
    rm -rf "$scratch"
  done
}

run_tests() {
  step "format and lint"
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets -- -D warnings
  step "tests"
  export POLYDEV_BIN="$PWD/target/release/polydev"
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
    # Ignored tests whose dependency this machine has after all.
    if [ -d /sys/module/vsock_loopback ]; then
      cargo nextest run -p polydev-mux --test endpoint --run-ignored only -E 'test(vsock_loopback)'
    fi
  else
    cargo test --workspace --no-fail-fast
  fi
  run_fuzz
}

case "${1:-up}" in
  setup) setup ;;
  up) setup; step "polydev up"; exec ./target/release/polydev up ;;
  test) setup; run_tests ;;
  *) echo "usage: $0 [up|test|setup]" >&2; exit 2 ;;
esac
