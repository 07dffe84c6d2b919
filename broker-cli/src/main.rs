//! `broker`: serve the broker, run a standalone proxy node, or run the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use broker::server::{self, ServeConfig, load_or_create_identity};
use broker_cli::demo::{self, DemoConfig};
use clap::{Parser, Subcommand};
use pre_kms::PublicIdentity;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "broker",
    version,
    about = "Proxy re-encryption research data broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the broker on a data directory, with its proxies.
    Serve {
        #[arg(long, default_value = "broker-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Operator public key file (`brokerctl keygen --role operator`); needed on first start.
        #[arg(long)]
        operator: Option<PathBuf>,
        /// Proxy nodes to run in this process, each on its own loopback port.
        #[arg(long, default_value_t = 3)]
        proxies: usize,
        /// External proxy nodes instead (`https://host:port`, in order; repeat the flag).
        #[arg(long = "proxy-url")]
        proxy_urls: Vec<String>,
        /// Each external proxy's certificate to pin (its directory's tls.crt), in the
        /// order of --proxy-url.
        #[arg(long = "proxy-cert")]
        proxy_certs: Vec<PathBuf>,
        /// Proxies needed to re-encrypt (t of n).
        #[arg(long, default_value_t = 2)]
        threshold: usize,
        /// How long a break-glass access lasts, in seconds (at most 24 hours, which the
        /// proxies enforce whatever this says).
        #[arg(long, default_value_t = 24 * 3600)]
        break_glass_window: i64,
        /// Break-glass attempts one clinician may make per hour (refused ones included);
        /// more are refused.
        #[arg(long, default_value_t = 5)]
        break_glass_per_hour: u32,
        /// A clinician's break-glass accesses in 24 hours above which each further one is
        /// flagged for the ethics board.
        #[arg(long, default_value_t = 3)]
        break_glass_flag_after: u32,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Create a data directory, the broker's identity (DATA_DIR/broker.key, and
    /// DATA_DIR/broker.pub for the proxy nodes) and its TLS certificate (DATA_DIR/tls.crt,
    /// for clients to pin); `serve` also does this on first start.
    Init {
        #[arg(long, default_value = "broker-data")]
        data_dir: PathBuf,
        /// Names (DNS or IP) clients reach the broker by, besides loopback; repeat the flag.
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
    },
    /// Check the access log of a stopped broker on disk: checkpoint signatures, and every
    /// record against every checkpoint.
    LogVerify {
        #[arg(long, default_value = "broker-data")]
        data_dir: PathBuf,
    },
    /// Run one proxy node (for a broker started with --proxy-url).
    Proxy {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:50061")]
        listen: SocketAddr,
        /// The broker's public key file (DATA_DIR/broker.pub, written by `broker serve`).
        #[arg(long)]
        broker_key: PathBuf,
        /// This node's position in the broker's --proxy-url list, from 0.
        #[arg(long)]
        index: u32,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Walk the whole flow on the embedded default and check every decrypted record.
    Demo {
        #[arg(long, default_value_t = 1000)]
        patients: usize,
        /// A new or empty directory (default: a new temporary directory, kept afterwards).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Patients per upload and grant batch.
        #[arg(long, default_value_t = 200)]
        batch: usize,
    },
}

/// How a server of this command is reached.
#[derive(clap::Args)]
struct TlsArgs {
    /// Names (DNS or IP) clients reach this server by, besides loopback, for its TLS
    /// certificate (made on first start; repeat the flag).
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// Plain http instead of TLS, for tests on this machine only (loopback addresses).
    #[arg(long)]
    insecure_loopback: bool,
}

/// Makes the data directory, the broker's identity and its TLS certificate if missing;
/// writes broker.pub.
fn init(
    data_dir: &std::path::Path,
    tls_names: &[String],
    insecure: bool,
) -> anyhow::Result<PathBuf> {
    pre_kms::private_fs::private_dir(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let identity = load_or_create_identity(&data_dir.join("broker.key"), "broker")?;
    let public_path = data_dir.join("broker.pub");
    identity.public("broker").write_file(&public_path)?;
    server::server_tls(data_dir, tls_names, insecure)?;
    Ok(public_path)
}

async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("shutting down");
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    // Colour only on a terminal: operators' log files and pipes get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,broker=info,broker_cli=info,proxy=info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve {
            data_dir,
            listen,
            operator,
            proxies,
            proxy_urls,
            proxy_certs,
            threshold,
            break_glass_window,
            break_glass_per_hour,
            break_glass_flag_after,
            tls,
        } => {
            let mut config = ServeConfig::new(&data_dir);
            config.break_glass = broker::service::BreakGlassPolicy {
                window_secs: break_glass_window,
                per_hour: break_glass_per_hour,
                flag_after: break_glass_flag_after,
            };
            config.embedded_proxies = proxies;
            config.proxy_urls = proxy_urls;
            config.proxy_certs = proxy_certs;
            config.threshold = threshold;
            config.tls_names = tls.tls_names.clone();
            config.insecure_loopback = tls.insecure_loopback;
            config.operator = operator
                .map(|p| PublicIdentity::read_file(&p))
                .transpose()?;
            let public_path = init(&data_dir, &tls.tls_names, tls.insecure_loopback)?;
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let running = server::start(listener, config, shutdown_signal()).await?;
            let pin = if tls.insecure_loopback {
                "plain http: not for real use".to_owned()
            } else {
                format!("clients pin {}", data_dir.join("tls.crt").display())
            };
            eprintln!(
                "broker listening on {} (data {}, broker key {}, {pin})",
                running.url(),
                data_dir.display(),
                public_path.display()
            );
            running.wait().await?;
        }
        Command::Init {
            data_dir,
            tls_names,
        } => {
            let public = init(&data_dir, &tls_names, false)?;
            println!(
                "broker identity ready; give {} to the proxy nodes (--broker-key) and {} to clients (--broker-cert)",
                public.display(),
                data_dir.join("tls.crt").display()
            );
        }
        Command::LogVerify { data_dir } => {
            let report = server::check_access_log(&data_dir)
                .map_err(|e| anyhow::anyhow!("the access log does NOT verify: {e}"))?;
            println!(
                "access log verified: {} events, {} checkpoints signed by this broker and matched{}",
                report.leaves,
                report.checked_sizes.len(),
                report
                    .torn_tail
                    .map(|t| format!(
                        "; a torn final write of {} bytes is not part of the log",
                        t.discarded_bytes
                    ))
                    .unwrap_or_default()
            );
        }
        Command::Proxy {
            dir,
            listen,
            broker_key,
            index,
            tls,
        } => {
            let broker = PublicIdentity::read_file(&broker_key)?;
            pre_kms::private_fs::private_dir(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            let identity = load_or_create_identity(&dir.join("proxy.key"), "proxy")?;
            let node = Arc::new(proxy::ProxyNode::open(&dir, identity, index)?);
            let server_tls = server::server_tls(&dir, &tls.tls_names, tls.insecure_loopback)?;
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            eprintln!(
                "proxy {index} listening on {}://{} (the broker pins {})",
                server_tls.scheme(),
                listener.local_addr()?,
                dir.join("tls.crt").display()
            );
            proxy::serve(
                listener,
                node,
                broker.verifying_key,
                &server_tls,
                shutdown_signal(),
            )
            .await?;
        }
        Command::Demo {
            patients,
            data_dir,
            seed,
            batch,
        } => {
            let data_dir = match data_dir {
                Some(d) => d,
                None => std::env::temp_dir().join(format!("broker-demo-{}", std::process::id())),
            };
            let summary = demo::run(DemoConfig {
                data_dir,
                patients,
                seed,
                batch: batch.max(1),
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            })
            .await?;
            println!("{summary}");
            anyhow::ensure!(summary.verified(), "the demo's check failed");
        }
    }
    Ok(())
}
