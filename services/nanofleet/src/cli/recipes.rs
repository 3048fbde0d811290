//! `nanofleet recipes ...`: drafts, electronic signatures, release and delivery.

use std::io::BufRead as _;
use std::path::Path;

use anyhow::Context as _;
use nanofleet_proto::device::v1::{Recipe, SignatureMeaning};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::recipe_service_client::RecipeServiceClient;

use nanofleet_api::json::{
    delivery_state, recipe_delivery, recipe_status, recipe_version as version_json,
    signature_meaning as meaning_name,
};

use super::{Authed, Client, Output, status_error, table, utc};
use crate::outln;

/// Where the signer's password comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordSource {
    /// Asked on the terminal, not echoed.
    Prompt,
    /// The first line of standard input (scripts).
    Stdin,
}

/// Reads a recipe from a JSON file (protobuf JSON mapping of
/// `nanofleet.device.v1.Recipe`; `nanofleet recipes example` prints one).
pub fn read_recipe(path: &Path) -> anyhow::Result<Recipe> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--file {}", path.display()))?;
    nanofleet_recipe::json::recipe_from_json(&text)
        .map_err(|e| anyhow::anyhow!("--file {}: {e}", path.display()))
}

/// A complete, valid example recipe as JSON, to start a draft from.
pub fn example_json(recipe_id: &str, site: &str) -> String {
    let targets =
        nanofleet_proto::device::v1::Targets { site_ids: vec![site.to_owned()], device_ids: vec![] };
    let recipe = nanofleet_recipe::example::example(recipe_id, 0, targets, super::now_ms());
    serde_json::to_string_pretty(&nanofleet_recipe::json::recipe_to_json(&recipe)).unwrap_or_default()
}

pub fn read_password(source: PasswordSource, user: &str) -> anyhow::Result<String> {
    let password = match source {
        PasswordSource::Prompt => {
            rpassword::prompt_password(format!("Password for {user} (electronic signature): "))
                .context("reading the password from the terminal (use --password-stdin in scripts)")?
        }
        PasswordSource::Stdin => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        anyhow::bail!("an electronic signature needs your password");
    }
    Ok(password)
}

/// `authored`, `approved`.
pub fn meaning_arg(s: &str) -> anyhow::Result<SignatureMeaning> {
    match s {
        "authored" => Ok(SignatureMeaning::Authored),
        "approved" => Ok(SignatureMeaning::Approved),
        other => anyhow::bail!("--meaning {other:?}: allowed: authored (pharmacist), approved (QA)"),
    }
}

fn signature_line(s: &pb::RecipeSignature) -> String {
    format!(
        "{} ({}) {} at {} UTC",
        s.printed_name,
        s.signer_id,
        meaning_name(s.meaning),
        utc(s.signed_unix_ms)
    )
}

impl Client {
    /// The id of the person the API token belongs to.
    pub async fn who_am_i(&self, server: &str) -> anyhow::Result<String> {
        Ok(self
            .people()
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .person
            .map(|p| p.id)
            .unwrap_or_default())
    }

    fn recipes(&self) -> RecipeServiceClient<Authed> {
        RecipeServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    fn print_version(&self, v: &pb::RecipeVersion, headline: &str) {
        self.report(
            || version_json(v),
            || {
                let r = v.recipe.clone().unwrap_or_default();
                let mut lines = vec![
                    format!(
                        "{headline}{} v{} \"{}\": {}",
                        r.recipe_id,
                        r.version,
                        r.name,
                        recipe_status(v.status)
                    ),
                    format!("  digest   {}", v.digest),
                    format!("  drafted  by {} at {} UTC", v.created_by, utc(v.created_unix_ms)),
                ];
                lines.extend(v.signatures.iter().map(|s| format!("  signed   {}", signature_line(s))));
                if !v.rejected_by.is_empty() {
                    lines.push(format!("  rejected by {}: {}", v.rejected_by, v.rejected_reason));
                }
                lines.join("\n")
            },
        );
    }

    pub async fn recipe_save(&self, server: &str, recipe: Recipe) -> anyhow::Result<()> {
        let v = self
            .recipes()
            .save_draft(pb::SaveDraftRequest { recipe: Some(recipe) })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .recipe
            .context("server answered without the recipe")?;
        self.print_version(&v, "saved ");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn recipe_sign(
        &self,
        server: &str,
        recipe_id: String,
        version: u32,
        meaning: SignatureMeaning,
        user_id: String,
        password: PasswordSource,
    ) -> anyhow::Result<()> {
        let user_id = if user_id.is_empty() { self.who_am_i(server).await? } else { user_id };
        let password = read_password(password, &user_id)?;
        let req = pb::SignRecipeRequest { recipe_id, version, meaning: meaning as i32, user_id, password };
        let v = self
            .recipes()
            .sign_recipe(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .recipe
            .context("server answered without the recipe")?;
        self.print_version(&v, "signed ");
        Ok(())
    }

    pub async fn recipe_reject(&self, server: &str, req: pb::RejectRecipeRequest) -> anyhow::Result<()> {
        let v = self
            .recipes()
            .reject_recipe(req)
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .recipe
            .context("server answered without the recipe")?;
        self.print_version(&v, "sent back ");
        Ok(())
    }

    pub async fn recipe_show(&self, server: &str, recipe_id: String, version: u32) -> anyhow::Result<()> {
        let v = self
            .recipes()
            .get_recipe(pb::GetRecipeRequest { recipe_id, version })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .recipe
            .context("server answered without the recipe")?;
        if self.output == Output::Json {
            self.print_json(version_json(&v));
            return Ok(());
        }
        self.print_version(&v, "");
        let r = v.recipe.clone().unwrap_or_default();
        let f = r.formula.unwrap_or_default();
        let l = f.lipids.unwrap_or_default();
        outln!(
            "  formula  lipids {}:{}:{}:{} mol %, N/P {}, FRR {}:1, TFR {} mL/min, {} mg/mL, pH {}, {} ug in {} mL at {} C",
            l.ionizable,
            l.phospholipid,
            l.cholesterol,
            l.peg_lipid,
            f.np_ratio,
            f.flow_rate_ratio,
            f.total_flow_ml_min,
            f.lipid_concentration_mg_ml,
            f.buffer_ph,
            f.dose_ug,
            f.batch_volume_ml,
            f.temperature_c
        );
        let t = r.targets.unwrap_or_default();
        outln!("  targets  sites [{}] devices [{}]", t.site_ids.join(", "), t.device_ids.join(", "));
        Ok(())
    }

    pub async fn recipe_list(&self, server: &str, req: pb::ListRecipesRequest) -> anyhow::Result<()> {
        let recipes =
            self.recipes().list_recipes(req).await.map_err(|s| status_error(server, s))?.into_inner().recipes;
        if self.output == Output::Json {
            self.print_json(
                serde_json::json!({ "recipes": recipes.iter().map(version_json).collect::<Vec<_>>() }),
            );
            return Ok(());
        }
        let mut t = table(["RECIPE", "VERSION", "NAME", "STATUS", "DRAFTED BY", "SIGNATURES"]);
        for v in &recipes {
            let r = v.recipe.clone().unwrap_or_default();
            let sigs = v
                .signatures
                .iter()
                .map(|s| format!("{} {}", meaning_name(s.meaning), s.signer_id))
                .collect::<Vec<_>>()
                .join(", ");
            t.add_row([
                r.recipe_id,
                r.version.to_string(),
                r.name,
                recipe_status(v.status).into(),
                v.created_by.clone(),
                sigs,
            ]);
        }
        outln!("{t}\n{} versions", recipes.len());
        Ok(())
    }

    pub async fn recipe_deliveries(
        &self,
        server: &str,
        recipe_id: String,
        version: u32,
    ) -> anyhow::Result<()> {
        let deliveries = self
            .recipes()
            .list_recipe_deliveries(pb::ListRecipeDeliveriesRequest { recipe_id, version })
            .await
            .map_err(|s| status_error(server, s))?
            .into_inner()
            .deliveries;
        if self.output == Output::Json {
            self.print_json(
                serde_json::json!({ "deliveries": deliveries.iter().map(recipe_delivery).collect::<Vec<_>>() }),
            );
            return Ok(());
        }
        let mut t = table(["DEVICE", "SITE", "VERSION", "STATE", "REASON"]);
        for d in &deliveries {
            t.add_row([
                d.device_id.clone(),
                d.site_id.clone(),
                d.version.to_string(),
                delivery_state(d.state).into(),
                if d.reason.is_empty() { d.code.clone() } else { format!("{}: {}", d.code, d.reason) },
            ]);
        }
        let count = |s: pb::DeliveryState| deliveries.iter().filter(|d| d.state == s as i32).count();
        outln!(
            "{t}\n{} devices: {} accepted, {} refused, {} pending",
            deliveries.len(),
            count(pb::DeliveryState::Accepted),
            count(pb::DeliveryState::Refused),
            count(pb::DeliveryState::Pending)
        );
        Ok(())
    }
}
