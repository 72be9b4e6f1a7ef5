"""Bucket set-up and deletion attempts for the audit shipping test, against the local
S3-compatible server the test starts.

    s3_object_lock.py create-bucket ENDPOINT BUCKET
        a bucket with Object Lock enabled and a default COMPLIANCE retention of one day
    s3_object_lock.py attack ENDPOINT BUCKET KEY
        with the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the gateway's),
        tries to destroy KEY: delete its original version, overwrite it (conditionally and
        plainly) and delete it plainly; prints what happened as JSON
"""

import hashlib
import json
import sys

import boto3
import botocore.exceptions


def client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def error_code(call):
    try:
        call()
        return None
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]


def create_bucket(s3, bucket):
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3.put_object_lock_configuration(
        Bucket=bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}},
        },
    )
    print(json.dumps({"created": bucket}))


def attack(s3, bucket, key):
    versions = [
        v for v in s3.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
        if v["Key"] == key
    ]
    original = versions[-1]["VersionId"]  # listed newest first
    head = s3.head_object(Bucket=bucket, Key=key, VersionId=original)
    before = s3.get_object(Bucket=bucket, Key=key, VersionId=original)["Body"].read()
    result = {
        "original_version": original,
        "retention_mode": head.get("ObjectLockMode"),
        "delete_version": error_code(
            lambda: s3.delete_object(Bucket=bucket, Key=key, VersionId=original)
        ),
        "delete_version_bypassing_governance": error_code(
            lambda: s3.delete_object(
                Bucket=bucket, Key=key, VersionId=original, BypassGovernanceRetention=True
            )
        ),
        "conditional_overwrite": error_code(
            lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"rewritten", IfNoneMatch="*")
        ),
        "plain_overwrite": error_code(
            lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"rewritten")
        ),
        "plain_delete": error_code(lambda: s3.delete_object(Bucket=bucket, Key=key)),
        "latest_readable": error_code(lambda: s3.get_object(Bucket=bucket, Key=key)),
    }
    after = s3.get_object(Bucket=bucket, Key=key, VersionId=original)["Body"].read()
    result["original_intact"] = before == after
    result["original_sha256"] = hashlib.sha256(after).hexdigest()
    print(json.dumps(result))


def main():
    command, endpoint, bucket = sys.argv[1:4]
    s3 = client(endpoint)
    if command == "create-bucket":
        create_bucket(s3, bucket)
    elif command == "attack":
        attack(s3, bucket, sys.argv[4])
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
