//! The harness itself, exercised for real: etcd, namespaces, containers, cleanup.

use weft_tests::Etcd;

#[tokio::test]
async fn local_etcd_serves_and_cleans_up() {
    let etcd = Etcd::start_local().await;
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    etcd.put("/weft-test/a", "1").await;
    etcd.put("/weft-test/b", "2").await;
    assert_eq!(etcd.get("/weft-test/a").await.as_deref(), Some("1"));
    assert_eq!(etcd.get("/weft-test/missing").await, None);
    assert_eq!(
        etcd.get_prefix("/weft-test/").await,
        vec![("/weft-test/a".into(), "1".into()), ("/weft-test/b".into(), "2".into())]
    );
    assert_eq!(etcd.delete("/weft-test/a").await, 1);
    let mut client = etcd.client().await;
    assert_eq!(client.get("/weft-test/a", None).await.unwrap().kvs().len(), 0);

    let (pid, dir) = (etcd.pid(), etcd.dir().unwrap().to_owned());
    drop(etcd);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "etcd {pid} still running");
    assert!(!dir.exists(), "{} left behind", dir.display());
}
