//! The access table, walked: every `nanofleet.v1` method is in it, and every role is
//! let through exactly where the table says, against a real server.

use std::collections::BTreeSet;

use nanofleet_api::Role;
use nanofleet_api::people::{Access, GRPC_ACCESS};
use nanofleet_proto::Message as _;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::people_service_client::PeopleServiceClient;
use nanofleet_tests::Sandbox;
use tonic::transport::Channel;
use tonic_prost::ProstCodec;

/// Calls `path` with an empty request (every request type's default) and the given
/// token; returns the status (Ok for a successful call).
async fn call(channel: &Channel, path: &str, token: Option<&str>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    if let Err(e) = grpc.ready().await {
        return tonic::Status::unavailable(e.to_string());
    }
    let mut req = tonic::Request::new(());
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("ascii"));
    }
    let codec: ProstCodec<(), ()> = ProstCodec::default();
    // As a server stream, which a unary method answers like one: a streaming method
    // (WatchAlerts) that accepted the call sends nothing until there is news.
    match grpc.server_streaming(req, path.parse().expect("path"), codec).await {
        Err(s) => s,
        Ok(response) => {
            let mut stream = response.into_inner();
            match tokio::time::timeout(std::time::Duration::from_secs(2), stream.message()).await {
                Ok(Err(s)) => s,
                _ => tonic::Status::ok(""),
            }
        }
    }
}

/// A refusal by the role check (not by the method itself).
fn refused_by_role(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::PermissionDenied && s.message().contains("may not call")
}

#[tokio::test]
async fn every_api_method_is_in_the_access_table() -> anyhow::Result<()> {
    let fds = prost_types::FileDescriptorSet::decode(nanofleet_proto::FILE_DESCRIPTOR_SET)?;
    let mut methods = BTreeSet::new();
    for file in fds.file.iter().filter(|f| f.package() == "nanofleet.v1") {
        for svc in &file.service {
            for m in &svc.method {
                methods.insert(format!("/nanofleet.v1.{}/{}", svc.name(), m.name()));
            }
        }
    }
    let table: BTreeSet<String> = GRPC_ACCESS.iter().map(|(p, _)| (*p).to_owned()).collect();
    assert_eq!(methods, table, "methods without a rule, or rules without a method");
    Ok(())
}

#[tokio::test]
async fn each_role_may_call_exactly_what_the_table_says() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    sb.server.ensure_site("site-a", "Site A", "UTC").await?;
    let channel = sb.grpc_channel().await?;
    let mut people = PeopleServiceClient::with_interceptor(channel.clone(), sb.admin());

    // One person and one API token per role.
    let mut tokens = Vec::new();
    for role in Role::ALL {
        let id = format!("p-{}", role.as_str());
        let site_id = if role.site_scoped() { "site-a".to_owned() } else { String::new() };
        people
            .create_person(pb::CreatePersonRequest {
                id: id.clone(),
                display_name: format!("Person {}", role.as_str()),
                role: role.to_pb() as i32,
                site_id,
                reason: "role table test".into(),
            })
            .await?;
        let t = people
            .create_api_token(pb::CreateApiTokenRequest {
                person_id: id,
                expires_in_seconds: 3600,
                description: "test".into(),
            })
            .await?
            .into_inner();
        tokens.push((role, t.secret_token));
    }

    let mut checked = 0;
    for (path, access) in GRPC_ACCESS {
        // Without a credential.
        let anonymous = call(&channel, path, None).await;
        match access {
            Access::Roles(_) => {
                assert_eq!(
                    anonymous.code(),
                    tonic::Code::Unauthenticated,
                    "{path} without a token: {anonymous:?}"
                );
                assert!(anonymous.message().contains("no credential"), "{path}: {anonymous:?}");
            }
            // Devices authenticate themselves; the layer lets them through.
            Access::Device => {
                assert!(!anonymous.message().contains("no credential"), "{path}: {anonymous:?}")
            }
        }
        // With each role.
        for (role, token) in &tokens {
            let status = call(&channel, path, Some(token)).await;
            let allowed = match access {
                Access::Roles(roles) => roles.contains(role),
                Access::Device => true,
            };
            assert_eq!(
                !refused_by_role(&status),
                allowed,
                "{path} as {}: {:?} {}",
                role.as_str(),
                status.code(),
                status.message()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, GRPC_ACCESS.len() * Role::ALL.len());

    // A garbage token is refused like none.
    let s =
        call(&channel, "/nanofleet.v1.FleetService/ListSites", Some("nfo1.000000000000000000.nope")).await;
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    sb.stop().await;
    Ok(())
}
