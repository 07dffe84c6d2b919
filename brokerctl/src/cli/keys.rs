//! `brokerctl keygen` and `brokerctl whoami`: your key pair, and who the broker thinks it
//! belongs to.

use std::path::{Path, PathBuf};

use model::Role;
use pre_kms::Identity;

use super::conn::{Conn, connect, print};

/// Makes a key pair: `out` (secret) and `out.pub`.
pub fn keygen(role: Role, out: &Path) -> anyhow::Result<()> {
    let id = Identity::generate();
    id.write_key_file(out, role.as_str())?;
    let public = pub_path(out);
    id.public(role.as_str()).write_file(&public)?;
    println!(
        "secret key {} (keep it private)\npublic key {}\nactor id   {}",
        out.display(),
        public.display(),
        id.actor_id()
    );
    Ok(())
}

pub async fn whoami(conn: &Conn) -> anyhow::Result<()> {
    let a = connect(conn).await?.whoami().await?;
    print(
        conn,
        &serde_json::json!({"actor_id": a.actor_id, "role": a.role, "name": a.name}),
        || format!("{} ({}), actor {}", a.name, a.role, a.actor_id),
    );
    Ok(())
}

fn pub_path(secret: &Path) -> PathBuf {
    let mut p = secret.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}
