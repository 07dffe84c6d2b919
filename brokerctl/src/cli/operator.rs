//! `brokerctl operator`: register actors, list them.

use std::path::PathBuf;

use clap::Subcommand;
use model::Role;
use pre_kms::PublicIdentity;

use super::conn::{Conn, connect, print};

#[derive(Subcommand)]
pub enum OperatorCmd {
    /// Register an actor's public key file under a role.
    Register {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        public_key: PathBuf,
        #[arg(long)]
        role: Role,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        organisation: String,
    },
    /// List registered actors.
    Actors(#[command(flatten)] Conn),
}

pub async fn run(cmd: OperatorCmd) -> anyhow::Result<()> {
    match cmd {
        OperatorCmd::Register {
            conn,
            public_key,
            role,
            name,
            organisation,
        } => {
            let public = PublicIdentity::read_file(&public_key)?;
            let key = pre_kms::keys::public_key_bytes(&public.verifying_key);
            let a = connect(&conn)
                .await?
                .register_actor(role, &name, &organisation, key)
                .await?;
            print(&conn, &serde_json::json!({"actor_id": a.actor_id}), || {
                format!("registered {name} as {role}: actor {}", a.actor_id)
            });
        }
        OperatorCmd::Actors(conn) => {
            let actors = connect(&conn).await?.list_actors().await?;
            let rows: Vec<_> = actors
                .iter()
                .map(|a| serde_json::json!({"actor_id": a.actor_id, "role": a.role, "name": a.name, "organisation": a.organisation}))
                .collect();
            print(&conn, &rows, || {
                actors
                    .iter()
                    .map(|a| {
                        format!(
                            "{}  {:<10} {} ({})",
                            a.actor_id,
                            a.role.as_str(),
                            a.name,
                            a.organisation
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}
