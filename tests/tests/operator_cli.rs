//! The operator's commands on a real store and key file, through the real
//! binary: `polydev upstream ls|show|pin|release|rotate` and
//! `polydev vault rotate` (new active key, every record re-wrapped, old
//! keys retired; the records still open).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use polydev_controller::store::Store;
use polydev_controller::vault::{Keyring, Vault};
use polydev_e2e::{polydev_bin, Run};

fn polydev(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    Command::new(polydev_bin())
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("POLYDEV_VAULT_KEYS")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run polydev")
        .into()
}

fn ok(data: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let r = polydev(data, args, env);
    assert_eq!(r.code, 0, "polydev {args:?}: {}{}", r.stdout, r.stderr);
    r.stdout
}

#[test]
fn upstream_commands_view_pin_release_and_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let pw = data.join("resi.pass");
    std::fs::write(&pw, "s3cret-upstream\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        data.join("upstreams.toml"),
        format!(
            "[[provider]]\nname = \"resi\"\nhost = \"127.0.0.1\"\nports = \"10000-10002\"\nusername = \"acct\"\npassword_file = \"{}\"\nquarantine_secs = 3600\n",
            pw.display()
        ),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(Store::open_in_dir(data)).unwrap();
    let a = rt.block_on(store.create_user("ann", "user")).unwrap();
    let b = rt.block_on(store.create_user("bob", "user")).unwrap();
    rt.block_on(store.close());

    let show = ok(data, &["upstream", "show", "ann"], &[]);
    assert!(show.contains("no upstream port yet"), "{show}");
    let pin = ok(data, &["upstream", "pin", "ann", "10001"], &[]);
    assert!(
        pin.contains(&a.id) && pin.contains("10001") && pin.contains("pinned"),
        "{pin}"
    );
    // Another user cannot be pinned to it: a clear error naming the holder.
    let r = polydev(data, &["upstream", "pin", &b.id, "10001"], &[]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("is assigned to user") && r.stderr.contains(&a.id),
        "{}",
        r.stderr
    );
    let rot = ok(data, &["upstream", "rotate", "ann"], &[]);
    assert!(rot.contains("rotated") && rot.contains("10000"), "{rot}");
    let rel = ok(data, &["upstream", "release", "ann"], &[]);
    assert!(rel.contains("quarantine") && rel.contains("10000"), "{rel}");
    let ls = ok(data, &["upstream", "ls"], &[]);
    assert!(
        ls.contains("3 ports, 0 assigned, 2 in quarantine, 1 free"),
        "{ls}"
    );
    assert!(
        ls.contains("quarantined: resi 10000") && ls.contains("quarantined: resi 10001"),
        "{ls}"
    );
    // The password never shows.
    assert!(!ls.contains("s3cret") && !rot.contains("s3cret"));
    let r = polydev(data, &["upstream", "release", "ann"], &[]);
    assert!(
        r.code != 0 && r.stderr.contains("has no upstream port"),
        "{}",
        r.stderr
    );
}

#[test]
fn vault_rotate_rewraps_every_record_and_retires_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let keys = data.join("vault-keys.toml");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(Store::open_in_dir(data)).unwrap();
    let ring = Keyring::load_or_create(&keys).unwrap();
    let old = ring.active_id().to_string();
    let vault = Vault::new(ring);
    let mut users = Vec::new();
    for i in 0..3 {
        let u = rt
            .block_on(store.create_user(&format!("v{i}"), "user"))
            .unwrap();
        rt.block_on(vault.store(&store, &u.id, "codex", format!("secret-{i}").as_bytes()))
            .unwrap();
        users.push(u.id);
    }
    rt.block_on(store.close());

    let out = ok(data, &["vault", "rotate"], &[]);
    assert!(out.contains("records re-wrapped: 3 (of 3)"), "{out}");
    assert!(
        out.contains(&format!("old keys retired: 1 ({old})")),
        "{out}"
    );
    let ring = Keyring::load(&keys).unwrap();
    assert_eq!(ring.ids().len(), 1);
    assert_ne!(ring.active_id(), old);
    assert_eq!(
        std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let store = rt.block_on(Store::open_in_dir(data)).unwrap();
    assert_eq!(
        rt.block_on(store.credential_key_ids()).unwrap(),
        vec![ring.active_id().to_string()]
    );
    let vault = Vault::new(ring);
    for (i, u) in users.iter().enumerate() {
        let pt = rt
            .block_on(vault.load(&store, u, "codex"))
            .unwrap()
            .unwrap();
        assert_eq!(&pt[..], format!("secret-{i}").as_bytes());
    }
    // Keys from the environment cannot be rotated by rewriting a file.
    let r = polydev(
        data,
        &["vault", "rotate"],
        &[("POLYDEV_VAULT_KEYS", "k1:AAAA")],
    );
    assert!(
        r.code != 0 && r.stderr.contains("POLYDEV_VAULT_KEYS is set"),
        "{}",
        r.stderr
    );
}
