//! `nanofleet firmware ...`: upload and release an image, list releases.

use std::path::Path;

use anyhow::Context as _;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::firmware_service_client::FirmwareServiceClient;
use sha2::Digest as _;
use tokio::io::AsyncReadExt as _;

use super::recipes::{PasswordSource, read_password};
use super::{Authed, Client, Output, status_error, table, utc};
use crate::outln;

/// Bytes per upload message.
const CHUNK: usize = 256 * 1024;

/// What `nanofleet firmware upload` releases.
#[derive(Debug, Clone)]
pub struct Upload {
    pub model: String,
    pub version: String,
    pub release_counter: u64,
    pub notes: String,
    pub user_id: String,
    pub password: PasswordSource,
}

fn release_json(r: &pb::FirmwareRelease) -> serde_json::Value {
    serde_json::json!({
        "target": r.target, "model": r.model, "version": r.version,
        "release_counter": r.release_counter, "sha256": r.sha256, "length": r.length,
        "released": utc(r.released_unix_ms), "released_by": r.released_by,
    })
}

impl Client {
    fn firmware(&self) -> FirmwareServiceClient<Authed> {
        FirmwareServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(16 * 1024 * 1024)
    }

    /// Hashes the file, then streams it with a progress bar; the server checks
    /// length and hash before it signs.
    pub async fn firmware_upload(&self, server: &str, path: &Path, u: Upload) -> anyhow::Result<()> {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        if !meta.is_file() {
            anyhow::bail!("{}: not a file", path.display());
        }
        let length = meta.len();
        let sha256 = {
            let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
            let mut h = sha2::Sha256::new();
            std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
            hex::encode(h.finalize())
        };
        let user_id = if u.user_id.is_empty() { self.who_am_i(server).await? } else { u.user_id };
        let password = read_password(u.password, &user_id)?;
        let header = pb::FirmwareHeader {
            model: u.model,
            version: u.version,
            release_counter: u.release_counter,
            length,
            sha256: sha256.clone(),
            user_id,
            password,
            notes: u.notes,
        };
        let bar = if self.output == Output::Table {
            let bar = indicatif::ProgressBar::new(length);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "uploading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let file = tokio::fs::File::open(path).await.with_context(|| format!("{}", path.display()))?;
        let progress = bar.clone();
        let first =
            pb::UploadFirmwareRequest { part: Some(pb::upload_firmware_request::Part::Header(header)) };
        let chunks = futures::stream::unfold(file, move |mut file| {
            let progress = progress.clone();
            async move {
                let mut buf = vec![0u8; CHUNK];
                match file.read(&mut buf).await {
                    Ok(0) | Err(_) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        progress.inc(n as u64);
                        Some((
                            pb::UploadFirmwareRequest {
                                part: Some(pb::upload_firmware_request::Part::Chunk(buf)),
                            },
                            file,
                        ))
                    }
                }
            }
        });
        let stream = futures::StreamExt::chain(futures::stream::iter([first]), chunks);
        let result = self.firmware().upload_firmware(stream).await;
        bar.finish_and_clear();
        let release = result
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .release
            .context("server answered without the release")?;
        if self.output == Output::Json {
            self.print_json(release_json(&release));
        } else {
            outln!(
                "released {} (model {}, version {}, release counter {}), {} bytes, sha256 {}",
                release.target,
                release.model,
                release.version,
                release.release_counter,
                release.length,
                release.sha256
            );
        }
        Ok(())
    }

    pub async fn firmware_list(&self, server: &str, model: String) -> anyhow::Result<()> {
        let releases = self
            .firmware()
            .list_firmware(pb::ListFirmwareRequest { model })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .releases;
        if self.output == Output::Json {
            self.print_json(serde_json::Value::Array(releases.iter().map(release_json).collect()));
            return Ok(());
        }
        if releases.is_empty() {
            outln!("no firmware released yet (nanofleet firmware upload FILE --model M --version V ...)");
            return Ok(());
        }
        let mut t = table(["MODEL", "VERSION", "COUNTER", "BYTES", "SHA256", "RELEASED", "BY"]);
        for r in &releases {
            t.add_row([
                r.model.clone(),
                r.version.clone(),
                r.release_counter.to_string(),
                r.length.to_string(),
                r.sha256.chars().take(16).collect(),
                utc(r.released_unix_ms),
                r.released_by.clone(),
            ]);
        }
        outln!("{t}");
        Ok(())
    }
}
