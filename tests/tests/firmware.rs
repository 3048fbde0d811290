//! Firmware releases against a real server: upload over gRPC with the releaser's
//! password, TUF metadata and images over HTTPS with the device's certificate and
//! range requests, the device's checks through tough, refusals of bad uploads, and a
//! restart.

use http_body_util::BodyExt as _;
use nanofleet_agent::slots::{ImageHeader, sim_image};
use nanofleet_firmware::client;
use nanofleet_firmware::https::Https;
use nanofleet_pki::trust_root::TrustRoot;
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::audit_service_client::AuditServiceClient;
use nanofleet_proto::v1::firmware_service_client::FirmwareServiceClient;
use nanofleet_tests::Sandbox;
use sha2::Digest as _;
use tonic::transport::Channel;
use url::Url;

type Client =
    FirmwareServiceClient<tonic::service::interceptor::InterceptedService<Channel, nanofleet::cli::Bearer>>;

fn image(version: &str, counter: u64) -> Vec<u8> {
    let h = ImageHeader {
        model: "NF-200".into(),
        version: version.into(),
        release_counter: counter,
        fault: "none".into(),
    };
    sim_image(&h, 300_000)
}

fn header(img: &[u8], version: &str, counter: u64, user: &str, password: &str) -> pb::FirmwareHeader {
    pb::FirmwareHeader {
        model: "NF-200".into(),
        version: version.into(),
        release_counter: counter,
        length: img.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(img)),
        user_id: user.into(),
        password: password.into(),
        notes: "pump pressure overshoot fixed".into(),
    }
}

async fn upload(
    fw: &mut Client,
    header: pb::FirmwareHeader,
    img: &[u8],
) -> Result<pb::FirmwareRelease, tonic::Status> {
    use pb::upload_firmware_request::Part;
    let mut msgs = vec![pb::UploadFirmwareRequest { part: Some(Part::Header(header)) }];
    msgs.extend(
        img.chunks(64 * 1024).map(|c| pb::UploadFirmwareRequest { part: Some(Part::Chunk(c.to_vec())) }),
    );
    Ok(fw.upload_firmware(futures::stream::iter(msgs)).await?.into_inner().release.unwrap_or_default())
}

fn expect(r: Result<pb::FirmwareRelease, tonic::Status>, code: tonic::Code, text: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} ({text}), got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(s.message().contains(text), "{:?} does not contain {text:?}", s.message());
        }
    }
}

async fn body(resp: hyper::Response<hyper::body::Incoming>) -> Vec<u8> {
    resp.into_body().collect().await.unwrap().to_bytes().to_vec()
}

#[tokio::test]
async fn a_release_is_downloaded_in_ranges_and_verified_by_an_enrolled_device() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    let (bearer, password) = sb.person_named("rel", "Rel Ops", pb::Role::Ops, "").await?;
    let mut fw = FirmwareServiceClient::with_interceptor(sb.grpc_channel().await?, bearer.clone());
    let img = image("2.4.0", 8);
    let rel = upload(&mut fw, header(&img, "2.4.0", 8, "rel", &password), &img).await?;
    assert_eq!(
        (rel.target.as_str(), rel.release_counter, rel.length),
        ("NF-200-2.4.0.img", 8, img.len() as u64)
    );
    assert_eq!(rel.released_by, "person:rel");
    let listed =
        fw.list_firmware(pb::ListFirmwareRequest { model: "NF-200".into() }).await?.into_inner().releases;
    assert_eq!(listed.len(), 1);

    // An enrolled device fetches the metadata and checks the release through tough.
    let creds = sb.enroll_device("st-fw", "NF-FW-1").await?;
    let https = Https::new(creds.client_config_arc()?);
    let base = Url::parse(&format!("https://{}/firmware/", sb.server.http_addr))?;
    let tuf_root = body(https.get(&base.join("metadata/1.root.json")?, None).await?).await;
    let trust = TrustRoot::from_json(&std::fs::read_to_string(sb.dir.path().join("pki/trust-root.json"))?)?;
    let datastore = tempfile::tempdir()?;
    let repo = client::load(
        &tuf_root,
        &trust,
        base.join("metadata/")?,
        base.join("targets/")?,
        datastore.path(),
        https.clone(),
    )
    .await?;
    let checked = client::check(&repo, &trust, &rel.target, "NF-200", 7)?;
    assert_eq!((checked.sha256.as_str(), checked.length), (rel.sha256.as_str(), rel.length));

    // The image, resumed from byte 100,000: only the rest comes.
    let url = base.join(&format!("targets/{}.{}", rel.sha256, rel.target))?;
    let resp = https.get(&url, Some(100_000)).await?;
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers().get("content-range").and_then(|v| v.to_str().ok()),
        Some(format!("bytes 100000-{}/{}", img.len() - 1, img.len()).as_str())
    );
    assert_eq!(body(resp).await, img[100_000..]);
    let whole = https.get(&url, None).await?;
    assert_eq!(whole.status(), 200);
    assert_eq!(body(whole).await, img);
    let past = https.get(&url, Some(img.len() as u64)).await.unwrap_err();
    assert_eq!(past.status, Some(416));

    // Without a device certificate or an operator token: refused.
    let roots = [sb.server.ca.root_cert().clone()];
    let anonymous = Https::new(std::sync::Arc::new(nanofleet_pki::tls::client_config(&roots, None)?));
    assert_eq!(anonymous.get(&url, None).await.unwrap_err().status, Some(401));
    // A decommissioned device is cut off from downloads at once.
    sb.server.trust.decommission(&nanofleet_api::Actor::system(), "NF-FW-1", "test").await?;
    assert_eq!(https.get(&url, None).await.unwrap_err().status, Some(403));

    // The release is in the audit chain, and survives a restart.
    let mut audit = AuditServiceClient::with_interceptor(sb.grpc_channel().await?, sb.admin());
    let records = audit
        .list_audit(pb::ListAuditRequest { action: "firmware.release".into(), ..Default::default() })
        .await?
        .into_inner()
        .records;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].reason, "pump pressure overshoot fixed");
    let sb = Sandbox::restart_in(sb.stop().await).await?;
    let mut fw = FirmwareServiceClient::with_interceptor(sb.grpc_channel().await?, bearer);
    let listed = fw.list_firmware(pb::ListFirmwareRequest::default()).await?.into_inner().releases;
    assert_eq!(listed.len(), 1);
    sb.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_uploads_are_refused_with_the_field_and_nothing_is_released() -> anyhow::Result<()> {
    let sb = Sandbox::start().await?;
    let (bearer, password) = sb.person_named("rel", "Rel Ops", pb::Role::Ops, "").await?;
    let mut fw = FirmwareServiceClient::with_interceptor(sb.grpc_channel().await?, bearer);
    let img = image("2.4.0", 8);
    let good = || header(&img, "2.4.0", 8, "rel", &password);

    let mut h = good();
    h.sha256 = "00".repeat(32);
    expect(upload(&mut fw, h, &img).await, tonic::Code::InvalidArgument, "header.sha256");
    let mut h = good();
    h.length += 1;
    expect(upload(&mut fw, h, &img).await, tonic::Code::InvalidArgument, "header.length");
    let mut h = good();
    h.model = "../NF-200".into();
    expect(upload(&mut fw, h, &img).await, tonic::Code::InvalidArgument, "model \"../NF-200\"");
    let mut h = good();
    h.password = "not-it".into();
    expect(upload(&mut fw, h, &img).await, tonic::Code::Unauthenticated, "password");
    let mut h = good();
    h.notes = " ".into();
    expect(upload(&mut fw, h, &img).await, tonic::Code::InvalidArgument, "header.notes");
    let mut h = good();
    h.length = 600 * 1024 * 1024;
    expect(upload(&mut fw, h, &img).await, tonic::Code::InvalidArgument, "1 to 536870912 bytes");
    // A stream that starts with bytes instead of a header.
    let chunk_first =
        vec![pb::UploadFirmwareRequest { part: Some(pb::upload_firmware_request::Part::Chunk(img.clone())) }];
    let s = fw.upload_firmware(futures::stream::iter(chunk_first)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{}", s.message());
    assert!(s.message().contains("a header first"), "{}", s.message());
    // QA may list releases but not make them.
    let qa = sb.person("qa1", pb::Role::Qa, "").await?;
    let mut fw_qa = FirmwareServiceClient::with_interceptor(sb.grpc_channel().await?, qa);
    expect(upload(&mut fw_qa, good(), &img).await, tonic::Code::PermissionDenied, "");
    assert!(fw_qa.list_firmware(pb::ListFirmwareRequest::default()).await?.into_inner().releases.is_empty());

    // The good one, then the same version again and a lower counter.
    upload(&mut fw, good(), &img).await?;
    let img2 = image("2.4.1", 9);
    expect(
        upload(&mut fw, header(&img2, "2.4.0", 9, "rel", &password), &img2).await,
        tonic::Code::FailedPrecondition,
        "was released already",
    );
    expect(
        upload(&mut fw, header(&img2, "2.4.1", 7, "rel", &password), &img2).await,
        tonic::Code::FailedPrecondition,
        "release_counter 7 is below 8",
    );
    let listed = fw.list_firmware(pb::ListFirmwareRequest::default()).await?.into_inner().releases;
    assert_eq!(listed.len(), 1);
    assert!(
        std::fs::read_dir(sb.dir.path().join("firmware/uploads"))?.next().is_none(),
        "no upload left behind"
    );
    sb.stop().await;
    Ok(())
}
