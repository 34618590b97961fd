//! CSV bodies (`text/csv`, `application/csv`) over HTTP: rows become items,
//! every malformed file is refused with its code and line, nothing stored.

use mongodb::bson::doc;
use serde_json::json;

use crate::helpers::{get_i64, json, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_csv_file_is_stored_as_one_batch_of_string_objects() {
    let app = spawn_app().await;
    // BOM, CRLF, a quoted cell with a comma, quotes and a line break, an empty cell.
    let body = "\u{feff}request_id,vendor_name,amount,note\r\n\
                r1,acme,12,\"big, \"\"urgent\"\"\r\norder\"\r\n\
                r2,globex,,\r\n";
    let response = app
        .post_raw(body.as_bytes().to_vec(), "text/csv; charset=utf-8", None)
        .await;
    assert_eq!(response.status(), 201);
    let reply = json(response).await;
    assert_eq!(reply["data"]["total_json_objects"], 2);
    assert_eq!(
        reply["data"]["vendor_counts"],
        json!({"acme": 1, "globex": 1})
    );

    let items = app
        .find_sorted("batch_items", doc! {}, doc! { "item_sequence": 1 })
        .await;
    let stored: Vec<serde_json::Value> = items
        .iter()
        .map(|i| serde_json::from_str(i.get_str("request_data").unwrap()).unwrap())
        .collect();
    assert_eq!(
        stored,
        [
            json!({"request_id": "r1", "vendor_name": "acme", "amount": "12", "note": "big, \"urgent\"\r\norder"}),
            json!({"request_id": "r2", "vendor_name": "globex", "amount": "", "note": ""}),
        ]
    );
    assert_eq!(items[0].get_str("request_id").unwrap(), "r1");
    assert_eq!(get_i64(&items[1], "item_sequence"), 2);

    // application/csv and LF line ends are accepted too.
    let response = app
        .post_raw(b"request_id\nr3\n".to_vec(), "application/csv", None)
        .await;
    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn malformed_csv_is_refused_with_its_code_and_line() {
    let app = spawn_app_with(&["--max-batch-items", "3"]).await;
    let cases: [(&[u8], u16, &str, Option<u64>); 8] = [
        (b"", 422, "empty_body", None),
        (b"\xEF\xBB\xBF\r\n", 422, "empty_body", None),
        (b"request_id,vendor_name\r\n", 422, "csv_no_rows", None),
        (b"a,b\r\n1,2\r\n3\r\n", 422, "csv_field_count", Some(3)),
        (b"a,,c\n1,2,3\n", 422, "csv_header", Some(1)),
        (b"a,b,a\n1,2,3\n", 422, "csv_header", Some(1)),
        (b"a\n1\n\xff\n", 400, "invalid_csv", Some(3)),
        (b"a\n1\n2\n3\n4\n", 413, "batch_too_large", None),
    ];
    for (body, status, code, line) in cases {
        let response = app.post_raw(body.to_vec(), "text/csv", None).await;
        assert_eq!(response.status(), status, "{code}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem = json(response).await;
        assert_eq!(problem["code"], code, "{problem}");
        assert_eq!(problem["line"].as_u64(), line, "{problem}");
    }
    app.assert_nothing_stored().await;
}
