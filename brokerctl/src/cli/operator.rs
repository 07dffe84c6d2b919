//! `brokerctl operator`: register actors, list them.

use std::path::PathBuf;

use brokerctl::agent;
use clap::Subcommand;
use model::Role;
use pre_kms::PublicIdentity;

use super::conn::{Conn, client_tls, connect, print};

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
    /// Register an emergency organisation: its clinicians (registered as `clinician`
    /// with `--organisation ID`) may break the glass, and patients who allow it hold
    /// standing grants of their critical records to its key. List it in the network
    /// manifest (`operator network`) for a board member to sign.
    EmergencyOrg {
        #[command(flatten)]
        conn: Conn,
        /// 1-64 lowercase letters, digits and -.
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        /// The organisation's public key file (`brokerctl keygen --role clinician`): its
        /// encryption key is what the standing grants re-encrypt to.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Write a draft network manifest (the broker's key, its proxies and threshold, its
    /// boards) for a board member to check and sign (`brokerctl board sign-network`).
    Network {
        #[command(flatten)]
        conn: Conn,
        /// The broker's public key file (broker.pub, written by `broker init`).
        #[arg(long)]
        broker_key: PathBuf,
        #[arg(long, default_value = "network.json")]
        out: PathBuf,
    },
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
            let a = connect(&conn)
                .await?
                .register_actor(role, &name, &organisation, &public)
                .await?;
            print(&conn, &serde_json::json!({"actor_id": a.actor_id}), || {
                format!("registered {name} as {role}: actor {}", a.actor_id)
            });
        }
        OperatorCmd::EmergencyOrg {
            conn,
            id,
            name,
            public_key,
        } => {
            let public = PublicIdentity::read_file(&public_key)?;
            let org = connect(&conn)
                .await?
                .register_emergency_org(model::EmergencyOrganisation {
                    organisation_id: id,
                    name,
                    receiving_key: pre_kms::keys::public_key_bytes(&public.encryption_key),
                })
                .await?;
            print(
                &conn,
                &serde_json::json!({"organisation_id": org.organisation_id, "name": org.name}),
                || {
                    format!(
                        "registered emergency organisation {} ({}); list it in the network manifest for a board member to sign",
                        org.organisation_id, org.name
                    )
                },
            );
        }
        OperatorCmd::Network {
            conn,
            broker_key,
            out,
        } => {
            let broker = PublicIdentity::read_file(&broker_key)?;
            // The certificate this connection pinned is the one the manifest pins.
            let tls = client_tls(&conn)?;
            let manifest = agent::draft_network(
                &connect(&conn).await?,
                &broker.verifying_key,
                tls.pinned_pem(),
            )
            .await?;
            manifest.write(&out)?;
            print(
                &conn,
                &serde_json::json!({"manifest": out, "proxies": manifest.proxies.len(),
                    "threshold": manifest.threshold, "boards": manifest.boards.len(),
                    "emergency_organisations": manifest.emergency_organisations.len()}),
                || {
                    format!(
                        "wrote {}: {} proxies, threshold {}, {} boards; unsigned until a board member signs it",
                        out.display(),
                        manifest.proxies.len(),
                        manifest.threshold,
                        manifest.boards.len()
                    )
                },
            );
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
