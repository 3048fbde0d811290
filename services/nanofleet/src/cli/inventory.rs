//! `nanofleet cartridges ...`, `nanofleet lots ...`, `nanofleet shipments ...` and
//! `nanofleet stock`: the catalogue, receipts by scan, recalls and stock.

use std::path::Path;

use anyhow::Context as _;
use nanofleet_proto::Message;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::inventory_service_client::InventoryServiceClient;

use super::recipes::{PasswordSource, read_password};
use super::{Authed, Client, Output, status_error, table, utc};
use crate::outln;

fn json<M: Message>(name: &str, m: &M) -> serde_json::Value {
    nanofleet_recipe::json::to_json(&format!("nanofleet.v1.{name}"), m)
}

/// A scan as typed: a scanner's GS may arrive as the two characters `\x1d` or `<GS>`.
pub fn typed_gs(scan: &str) -> String {
    scan.replace("\\x1d", "\u{1d}").replace("<GS>", "\u{1d}")
}

/// Reads scans, one per line, from a file or `-` (stdin); blank lines are skipped.
pub fn read_scans(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading scans from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("--scans {}", path.display()))?
    };
    Ok(text.lines().map(|l| typed_gs(l.trim_end_matches('\r'))).filter(|l| !l.trim().is_empty()).collect())
}

/// Reads logger readings: a CSV of `time,celsius` with RFC 3339 or Unix-ms times
/// (a header line is skipped).
pub fn read_readings(path: &Path) -> anyhow::Result<Vec<pb::TemperatureReading>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--readings {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.chars().next().is_some_and(|c| c.is_alphabetic())) {
            continue;
        }
        let (t, c) = line
            .split_once(',')
            .with_context(|| format!("--readings line {}: {line:?} is not time,celsius", i + 1))?;
        let time_unix_ms = match t.trim().parse::<i64>() {
            Ok(ms) => ms,
            Err(_) => t
                .trim()
                .parse::<jiff::Timestamp>()
                .with_context(|| format!("--readings line {}: time {t:?} is not RFC 3339 or Unix ms", i + 1))?
                .as_millisecond(),
        };
        let celsius = c
            .trim()
            .parse::<f64>()
            .with_context(|| format!("--readings line {}: {c:?} is not a temperature", i + 1))?;
        out.push(pb::TemperatureReading { time_unix_ms, celsius });
    }
    Ok(out)
}

fn cover(d: Option<f64>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{d:.1} d"))
}

impl Client {
    fn inventory(&self) -> InventoryServiceClient<Authed> {
        InventoryServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
    }

    pub async fn cartridge_type_add(&self, server: &str, t: pb::CartridgeType) -> anyhow::Result<()> {
        let r = self
            .inventory()
            .create_cartridge_type(pb::CreateCartridgeTypeRequest { cartridge_type: Some(t) })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        let t = r.cartridge_type.unwrap_or_default();
        if self.output == Output::Json {
            self.print_json(json("CartridgeType", &t));
        } else {
            outln!("cartridge type {} added: {} ({}, {} mL)", t.gtin, t.name, t.storage_class, t.volume_ml);
        }
        Ok(())
    }

    pub async fn cartridge_types(&self, server: &str) -> anyhow::Result<()> {
        let r = self
            .inventory()
            .list_cartridge_types(pb::ListCartridgeTypesRequest {})
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(json("ListCartridgeTypesResponse", &r));
            return Ok(());
        }
        let mut t =
            table(["GTIN", "NAME", "STORAGE", "VOLUME", "EXCURSION LIMIT", "LEAD TIME", "MODELS", "RECIPES"]);
        for k in &r.cartridge_types {
            t.add_row([
                k.gtin.clone(),
                k.name.clone(),
                k.storage_class.clone(),
                format!("{} mL", k.volume_ml),
                format!("{} min", k.excursion_limit_min),
                format!("{} d", k.lead_time_days),
                if k.device_models.is_empty() { "any".into() } else { k.device_models.join(",") },
                k.recipe_ids.join(","),
            ]);
        }
        outln!("{t}");
        Ok(())
    }

    pub async fn cartridge_scan(&self, server: &str, req: pb::ScanCartridgeRequest) -> anyhow::Result<bool> {
        let r = self.inventory().scan_cartridge(req).await.map_err(|s| status_error(server, s))?.into_inner();
        if self.output == Output::Json {
            self.print_json(json("ScanCartridgeResponse", &r));
            return Ok(r.usable);
        }
        let code = r.code.clone().unwrap_or_default();
        outln!(
            "GTIN {}  lot {}  serial {}  expires {}",
            code.gtin,
            code.lot,
            code.serial,
            utc(code.expires_unix_ms)
        );
        if let Some(c) = &r.cartridge {
            outln!(
                "status {}{}{}  lot {}",
                c.status,
                if c.site_id.is_empty() { String::new() } else { format!(" at {}", c.site_id) },
                if c.device_id.is_empty() { String::new() } else { format!(" in {}", c.device_id) },
                c.lot_status
            );
        }
        if r.usable {
            outln!("usable: yes");
        } else {
            outln!("usable: NO");
            for p in &r.problems {
                outln!("  - {p}");
            }
        }
        Ok(r.usable)
    }

    pub async fn cartridge_show(&self, server: &str, gtin: String, serial: String) -> anyhow::Result<()> {
        let r = self
            .inventory()
            .get_cartridge(pb::GetCartridgeRequest { gtin, serial })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(json("GetCartridgeResponse", &r));
            return Ok(());
        }
        let c = r.cartridge.unwrap_or_default();
        outln!(
            "cartridge {} serial {} (lot {}, {}), expires {}",
            c.gtin,
            c.serial,
            c.lot,
            c.lot_status,
            utc(c.expires_unix_ms)
        );
        outln!(
            "status {}  site {}  device {}  location {}  batch {}",
            c.status,
            or_dash(&c.site_id),
            or_dash(&c.device_id),
            or_dash(&c.location),
            or_dash(&c.batch_id)
        );
        let mut t = table(["WHEN", "EVENT", "SITE", "DEVICE", "BY", "DETAIL"]);
        for e in &r.events {
            t.add_row([
                utc(e.time_unix_ms),
                e.kind.clone(),
                e.site_id.clone(),
                e.device_id.clone(),
                e.actor.clone(),
                e.detail.clone(),
            ]);
        }
        outln!("{t}");
        Ok(())
    }

    pub async fn cartridge_move(&self, server: &str, req: pb::MoveCartridgeRequest) -> anyhow::Result<()> {
        let c = self
            .inventory()
            .move_cartridge(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .cartridge
            .unwrap_or_default();
        if self.output == Output::Json {
            self.print_json(json("Cartridge", &c));
        } else {
            outln!("cartridge {} is {} at {}", c.serial, c.status, or_dash(&c.site_id));
        }
        Ok(())
    }

    /// Sends the scans of a shipment with the logger's readings; a progress bar shows
    /// the scans read.
    pub async fn shipment_receive(
        &self,
        server: &str,
        req: pb::ReceiveShipmentRequest,
    ) -> anyhow::Result<()> {
        let r =
            self.inventory().receive_shipment(req).await.map_err(|s| status_error(server, s))?.into_inner();
        if self.output == Output::Json {
            self.print_json(json("ReceiveShipmentResponse", &r));
            return Ok(());
        }
        let s = r.shipment.unwrap_or_default();
        outln!(
            "shipment {}: {} received at {} ({} of {} now), {:.0} min outside the storage class ({:.0} unlogged)",
            s.shipment_id,
            r.received,
            s.site_id,
            s.received_count,
            s.count,
            r.excursion_minutes,
            r.unlogged_minutes
        );
        if r.blocked > 0 {
            outln!(
                "BLOCKED: {} cartridges, over the type's excursion limit; every device refuses them",
                r.blocked
            );
        }
        Ok(())
    }

    pub async fn shipment_send(
        &self,
        server: &str,
        req: pb::ShipCartridgesRequest,
        codes: Option<&Path>,
    ) -> anyhow::Result<()> {
        let s = self
            .inventory()
            .ship_cartridges(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .shipment
            .unwrap_or_default();
        if let Some(path) = codes {
            let text: String = s.codes.iter().map(|c| c.replace('\u{1d}', "\\x1d") + "\n").collect();
            std::fs::write(path, text).with_context(|| format!("--codes {}", path.display()))?;
        }
        if self.output == Output::Json {
            self.print_json(json("Shipment", &s));
        } else {
            outln!("shipment {}: {} cartridges of lot {} to {}", s.shipment_id, s.count, s.lot, s.site_id);
            if let Some(path) = codes {
                outln!("their codes: {} (one per line, GS written as \\x1d)", path.display());
            }
        }
        Ok(())
    }

    pub async fn shipments(&self, server: &str, site_id: String) -> anyhow::Result<()> {
        let r = self
            .inventory()
            .list_shipments(pb::ListShipmentsRequest { site_id })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(json("ListShipmentsResponse", &r));
            return Ok(());
        }
        let mut t = table(["SHIPMENT", "SITE", "LOT", "COUNT", "SENT", "RECEIVED", "EXCURSION", "BLOCKED"]);
        for s in &r.shipments {
            t.add_row([
                s.shipment_id.clone(),
                s.site_id.clone(),
                s.lot.clone(),
                s.count.to_string(),
                utc(s.sent_unix_ms),
                if s.received_unix_ms == 0 {
                    "in transit".into()
                } else {
                    format!("{} at {}", s.received_count, utc(s.received_unix_ms))
                },
                format!("{:.0} min", s.excursion_minutes),
                if s.blocked { "yes".into() } else { String::new() },
            ]);
        }
        outln!("{t}");
        Ok(())
    }

    pub async fn lot_create(&self, server: &str, req: pb::CreateLotRequest) -> anyhow::Result<()> {
        let l = self
            .inventory()
            .create_lot(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .lot
            .unwrap_or_default();
        if self.output == Output::Json {
            self.print_json(json("Lot", &l));
        } else {
            outln!(
                "lot {} of {}: {} cartridges registered, in quarantine until QA releases it",
                l.lot,
                l.gtin,
                l.quantity
            );
        }
        Ok(())
    }

    pub async fn lot_release(&self, server: &str, req: pb::ReleaseLotRequest) -> anyhow::Result<()> {
        let l = self
            .inventory()
            .release_lot(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .lot
            .unwrap_or_default();
        if self.output == Output::Json {
            self.print_json(json("Lot", &l));
        } else {
            outln!("lot {} of {} released", l.lot, l.gtin);
        }
        Ok(())
    }

    pub async fn lots(&self, server: &str, req: pb::ListLotsRequest) -> anyhow::Result<()> {
        let r = self.inventory().list_lots(req).await.map_err(|s| status_error(server, s))?.into_inner();
        if self.output == Output::Json {
            self.print_json(json("ListLotsResponse", &r));
            return Ok(());
        }
        let mut t = table(["GTIN", "LOT", "PRODUCED", "EXPIRES", "QUANTITY", "STATUS", "WHY"]);
        for l in &r.lots {
            t.add_row([
                l.gtin.clone(),
                l.lot.clone(),
                l.produced.clone(),
                l.expires.clone(),
                l.quantity.to_string(),
                l.status.clone(),
                l.status_reason.clone(),
            ]);
        }
        outln!("{t}");
        Ok(())
    }

    fn print_trace(&self, places: &[pb::LotPlace], runs: &[pb::TracedRun]) {
        let mut t = table(["SITE", "STATUS", "CARTRIDGES"]);
        for p in places {
            t.add_row([
                if p.site_id.is_empty() { "(manufacturer)".into() } else { p.site_id.clone() },
                p.status.clone(),
                p.count.to_string(),
            ]);
        }
        outln!("where the lot is:\n{t}");
        if runs.is_empty() {
            outln!("no run used the lot");
            return;
        }
        let mut t = table(["STARTED", "SITE", "DEVICE", "BATCH", "SERIAL", "PRESCRIPTION", "PATIENT"]);
        for r in runs {
            t.add_row([
                utc(r.started_unix_ms),
                r.site_id.clone(),
                r.device_id.clone(),
                r.batch_id.clone(),
                r.serial.clone(),
                r.prescription_id.clone(),
                r.patient_pseudonym.clone(),
            ]);
        }
        outln!("{} runs used the lot (prescriptions and patients to contact):\n{t}", runs.len());
    }

    pub async fn lot_show(&self, server: &str, req: pb::GetLotRequest) -> anyhow::Result<()> {
        let r = self.inventory().get_lot(req).await.map_err(|s| status_error(server, s))?.into_inner();
        if self.output == Output::Json {
            self.print_json(json("GetLotResponse", &r));
            return Ok(());
        }
        let l = r.lot.clone().unwrap_or_default();
        outln!(
            "lot {} of {}: {} ({}), produced {}, expires {}, {} cartridges",
            l.lot,
            l.gtin,
            l.status,
            l.status_reason,
            l.produced,
            l.expires,
            l.quantity
        );
        for rc in &r.recalls {
            outln!(
                "recall {} by {} ({}) at {}: {} — deny list v{}",
                rc.recall_id,
                rc.printed_name,
                rc.signer_id,
                utc(rc.signed_unix_ms),
                rc.reason,
                rc.deny_list_version
            );
        }
        self.print_trace(&r.places, &r.runs);
        Ok(())
    }

    /// Recalls a lot with the caller's electronic signature and prints the trace.
    pub async fn lot_recall(
        &self,
        server: &str,
        gtin: String,
        lot: String,
        reason: String,
        user: String,
        password: PasswordSource,
    ) -> anyhow::Result<()> {
        let user_id = if user.is_empty() { self.who_am_i(server).await? } else { user };
        let password = read_password(password, &user_id)?;
        let r = self
            .inventory()
            .recall_lot(pb::RecallLotRequest { gtin, lot, reason, user_id, password })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(json("RecallLotResponse", &r));
            return Ok(());
        }
        let rc = r.recall.clone().unwrap_or_default();
        outln!(
            "recall {}: lot {} of {} recalled; deny list v{} sent to {} of {} devices now (the others at their next connection)",
            rc.recall_id,
            rc.lot,
            rc.gtin,
            rc.deny_list_version,
            r.devices_sent,
            r.devices_total
        );
        outln!("follow the acknowledgements: nanofleet lots deny-list");
        self.print_trace(&r.places, &r.runs);
        outln!("trace in {} ms", r.trace_ms);
        Ok(())
    }

    pub async fn deny_list_status(&self, server: &str) -> anyhow::Result<()> {
        let r = self
            .inventory()
            .get_deny_list_status(pb::GetDenyListStatusRequest {})
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(json("GetDenyListStatusResponse", &r));
            return Ok(());
        }
        if r.version == 0 {
            outln!("no deny list issued yet");
            return Ok(());
        }
        outln!(
            "deny list v{} issued {}: {} lots, {} cartridges; acknowledged by {} of {} devices",
            r.version,
            utc(r.issued_unix_ms),
            r.lots,
            r.cartridges,
            r.devices_acked,
            r.devices_total
        );
        if !r.pending.is_empty() {
            let mut t = table(["DEVICE", "SITE", "ONLINE", "HOLDS", "ANSWER"]);
            for p in &r.pending {
                t.add_row([
                    p.device_id.clone(),
                    p.site_id.clone(),
                    if p.online { "yes".into() } else { "no".into() },
                    if p.acked_version == 0 { "-".into() } else { format!("v{}", p.acked_version) },
                    if p.result.is_empty() {
                        "no answer".into()
                    } else {
                        format!("{} {} {}", p.result, p.code, p.reason)
                    },
                ]);
            }
            outln!("not acknowledged:\n{t}");
        }
        Ok(())
    }

    pub async fn stock(&self, server: &str, site_id: String) -> anyhow::Result<()> {
        let r = self
            .inventory()
            .get_stock(pb::GetStockRequest { site_id })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner();
        if self.output == Output::Json {
            self.print_json(json("GetStockResponse", &r));
            return Ok(());
        }
        if r.lines.is_empty() {
            outln!("no stock and no consumption yet");
            return Ok(());
        }
        let mut t = table([
            "SITE",
            "TYPE",
            "ON HAND",
            "USABLE",
            "IN TRANSIT",
            "PER DAY",
            "COVER",
            "REORDER AT",
            "ORDER NOW",
            "ALERTS",
        ]);
        for l in &r.lines {
            t.add_row([
                l.site_id.clone(),
                if l.name.is_empty() { l.gtin.clone() } else { l.name.clone() },
                l.on_hand.to_string(),
                l.usable.to_string(),
                l.in_transit.to_string(),
                format!("{:.1}", l.consumption_per_day),
                cover(l.days_of_cover),
                l.reorder_point.to_string(),
                l.suggested_order.to_string(),
                l.alerts.iter().map(|a| a.message.clone()).collect::<Vec<_>>().join("; "),
            ]);
        }
        outln!("{t}");
        Ok(())
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
